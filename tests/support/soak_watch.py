"""What the soak does beside the load: a monitor sampling the daemon every second, and the
operator's chores (audit trail rotated by rename and SIGHUP, policy edited and reloaded).

The monitor reads ``/proc`` of the supervisor and its workers: the sum of their resident set
sizes (``VmRSS``), the sum of their open file descriptors, and which worker pids exist; and
the live entries of the nonce store (the ``counts`` row the store keeps of its live nonces,
read from its SQLite file without writing).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signerd.testing import SignerdProcess, to_toml, wait_until

__all__ = ["Chores", "Monitor", "Sample"]


@dataclass(frozen=True)
class Sample:
    """The daemon at one moment (``time`` is ``time.monotonic()``)."""

    time: float
    rss_kib: int
    fds: int
    nonces: int
    workers: tuple[int, ...]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _nonces(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT n FROM counts WHERE tenant = '*'").fetchone()
    except sqlite3.OperationalError:  # not made yet
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0


@dataclass
class Monitor:
    """Samples ``daemon`` every ``interval`` seconds from a thread of its own."""

    daemon: SignerdProcess
    nonce_db: Path
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-monitor", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def sample(self) -> Sample:
        workers = tuple(sorted(self.daemon.worker_pids()))
        rss = fds = 0
        for pid in (self.daemon.pid, *workers):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                rss += _rss_kib(pid)
                fds += len(os.listdir(f"/proc/{pid}/fd"))
        return Sample(time.monotonic(), rss, fds, _nonces(self.nonce_db), workers)

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except (OSError, sqlite3.Error) as exc:  # reported by the checks, never hidden
                self.errors.append(f"{type(exc).__name__}: {exc}")
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


@dataclass
class Chores:
    """Audit rotations and policy reloads, taking turns, every ``every`` seconds."""

    daemon: SignerdProcess
    every: float
    tenant: str  # the clients' tenant
    rotations: int = 0
    reloads: int = 0
    hups: int = 0
    log: list[tuple[float, str]] = field(default_factory=list)

    def run(self, until: float) -> None:
        """Until ``until`` (monotonic), leaving the last stretch of the run undisturbed."""
        turn = 0
        next_at = time.monotonic() + self.every
        while next_at < until - self.every / 2:
            time.sleep(max(0.0, next_at - time.monotonic()))
            if turn % 2 == 0:
                self.rotate_audit()
            else:
                self.reload_policy()
            turn += 1
            next_at += self.every
        time.sleep(max(0.0, until - time.monotonic()))

    def _reloaded(self) -> int:
        return self.daemon.log_text().count("signerd.policy_reloaded")

    def _hup(self, what: str) -> None:
        """SIGHUP, then wait until every worker logged that it reloaded."""
        before = self._reloaded()
        workers = len(self.daemon.worker_pids())
        self.daemon.sighup()
        self.hups += 1
        self.log.append((time.monotonic(), what))
        wait_until(lambda: self._reloaded() >= before + workers, 20, f"{what}: reloads")

    def rotate_audit(self) -> None:
        """Rename every worker's trail file (``audit.wN.jsonl`` to ``audit.wN.jsonl.K``), then
        SIGHUP; the workers continue their chains in new files of the old names."""
        self.rotations += 1
        directory = self.daemon.audit_path.parent
        live = sorted(directory.glob(f"{self.daemon.audit_path.stem}.w*.jsonl"))
        for path in live:
            path.rename(f"{path}.{self.rotations}")
        self._hup("audit rotation")
        wait_until(lambda: all(p.exists() for p in live), 20, "the new trail files")

    def reload_policy(self) -> None:
        """Edit the policy in the configuration file, then SIGHUP: the clients' rule is narrowed
        to the soak's tenant (or widened to every tenant again), and a second rule is added
        (or changed). The clients keep every grant they use, so none may be refused."""
        self.reloads += 1
        config: dict[str, Any] = self.daemon.config
        ours = {**config["policy"]["rules"][0]}
        ours["tenants"] = [self.tenant] if self.reloads % 2 else ["*"]
        extra = {
            "name": f"soak-{self.reloads}",
            "uids": [os.getuid() + 1 + self.reloads % 7],
            "tenants": ["*"],
            "operations": ["verify"],
        }
        config["policy"] = {**config["policy"], "rules": [ours, extra]}
        self.daemon.config_path.write_text(to_toml(config))
        self._hup("policy reload")
