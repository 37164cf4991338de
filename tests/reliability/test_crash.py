"""kill -9 in the middle of signs and rotations, 20 times per kind, on one SoftHSM token.

Each kind keeps one token directory and one audit directory across its 20 crashes: what a
crash leaves behind must be what the next start reads. After each restart the daemon is held
to every answer callers were given before (tests/support/crash.py): one active version per
key, every version answered still there with the same public key, the JWKS exactly the
versions that verify, new versions above all of them, every acknowledged signature with its
record in the trail and still verifying unless its version was retired or destroyed since,
and the whole trail (every worker's file) verifying against its anchors. Each kind also
forwards its trail over RELP to a real rsyslogd (imrelp, started here): after the last
round and a clean stop, ``signerctl audit verify --forwarded`` checks the trail against the
signed checkpoints the collector wrote, and the collector holds every record of the trail
(copies only as docs/audit-forwarding.md allows them, byte for byte). Kill times are
random within the load window; the seed is in every failure's message
(``SIGNERD_CRASH_SEED=N`` replays one).
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.client import Client
from signerd.testing import SignerdProcess, SoftHSMToken, allow_all, make_token, start, wait_until

from ..conftest import ROOT, unique
from ..support.crash import Ledger, check_restart, run_load, token_objects
from ..support.rsyslog import Rsyslog

ROUNDS = 20
LOAD_SECONDS = 1.0
KEYS = 2
CHECKPOINT_KEY = "crashfwd/checkpoints"
HOST = "crash-host"
#: records a forwarder killed between an answer and saving its position sends again
#: (one batch: docs/audit-forwarding.md, "If the forwarder itself is killed")
BATCH_RECORDS = 512

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def seed() -> int:
    return int(os.environ.get("SIGNERD_CRASH_SEED") or random.randrange(1 << 32))


class Crashes:
    """One daemon configuration, started again after each crash, on one token and trail."""

    def __init__(self, base: Path, token: SoftHSMToken, seed: int, collector: Rsyslog) -> None:
        self.base, self.token, self.seed, self.collector = base, token, seed, collector
        self.rng = random.Random(seed)
        self.config: dict[str, Any] = {
            "server": {
                "socket": str(base / "run" / "signerd.sock"),
                "workers": 2,
                "log_level": "info",
            },
            "keys": {
                "default_backend": "hsm",
                "refresh_interval": 0,
                "bootstrap": [CHECKPOINT_KEY],
            },
            "backends": {"hsm": token.backend_config()},
            "audit": {"path": str(base / "audit" / "audit.jsonl"), "anchor_interval": 0.2},
            "forwarding": {
                "host": "127.0.0.1",
                "port": collector.port,
                "transport": "relp",
                "checkpoint_key": CHECKPOINT_KEY,
                "checkpoint_interval": 0.5,
                "hostname": HOST,
            },
            "policy": allow_all(),
        }
        self.keys = [f"{unique('cr')}/k{i}" for i in range(KEYS)]
        self.ledger = Ledger(rng=random.Random(seed))
        self.totals = {"rounds": 0, "unpaired": 0}
        self.out = base / "answers" / "load"
        self.out.parent.mkdir(parents=True)
        self.starts = 0
        self.forwarder_kills = 0  # kills that took the forwarder down with the daemon
        self.copies = 0  # records the collector got twice so far
        self.daemon = self.start()
        c = Client(self.daemon.socket_path)
        for key in self.keys:
            c.create_key(key)

    def start(self) -> SignerdProcess:
        """The daemon on the same token and trail; each start logs to a directory of its own."""
        self.starts += 1
        env = {k: v for k, v in self.token.env().items() if k != "STATE_DIRECTORY"}
        return start(self.config, self.base / f"run{self.starts}", env=env, cwd=ROOT, wait=60.0)

    def logs(self) -> str:
        return "".join(
            self.base.joinpath(f"run{n}", "signerd.log").read_text(errors="replace")
            for n in range(max(1, self.starts - 1), self.starts + 1)
        )[-4000:]

    def round(self, n: int, kill: Callable[[SignerdProcess], None]) -> None:
        """Load, a kill at a random moment of it (``kill`` also restarts), and the checks."""
        at = self.rng.uniform(0.15, LOAD_SECONDS - 0.15)
        sock = str(self.daemon.socket_path)
        kills = self.forwarder_kills
        try:
            with run_load(sock, self.keys, self.out, self.seed + n, LOAD_SECONDS) as until:
                time.sleep(max(0.0, until - LOAD_SECONDS + at - time.time()))
                kill(self.daemon)
            self.ledger.read(self.out)
            c = Client(self.daemon.socket_path, timeout=30.0)
            got = check_restart(c, self.keys, self.ledger, self.daemon.audit_path.parent)
            self.settled()
            wait_until(lambda: self.caught_up(heads=False), 60, "the collector to catch up")
            copies = self.check_forwarded()  # the copies a kill causes come first after it
            assert copies - self.copies <= BATCH_RECORDS * (self.forwarder_kills - kills), (
                f"{copies - self.copies} copies after a round with "
                f"{self.forwarder_kills - kills} kills of the forwarder"
            )
            self.copies = copies
        except (
            Exception
        ) as exc:  # InvalidSignature, a refused call, a failed start: all with the seed
            raise AssertionError(
                f"SIGNERD_CRASH_SEED={self.seed}, round {n}: {exc!r}\n{self.logs()}"
            ) from exc
        self.totals["rounds"] += 1
        self.totals["unpaired"] = got["unpaired"]

    def finish(self) -> None:
        """A clean stop; then signerctl verifies the trail, and the token holds a private key
        for every version that is not destroyed and none for those that are."""
        final = {key: Client(self.daemon.socket_path).get_key(key).versions for key in self.keys}
        jwks = self.base / "jwks.json"
        jwks.write_text(json.dumps({"keys": Client(self.daemon.socket_path).jwks()}))
        audit_dir = str(self.daemon.audit_path.parent)
        self.settled()
        wait_until(self.caught_up, 60, "the collector to hold the whole trail and its heads")
        assert self.daemon.stop() == 0, self.logs()
        self.verify(audit_dir)
        forwarded = self.verify(
            audit_dir, "--forwarded", str(self.collector.out), "--jwks", str(jwks)
        )
        assert "signed checkpoints" in forwarded, forwarded
        copies = self.check_forwarded()
        private = set(token_objects(self.token)["private"])
        for versions in final.values():
            for v in versions:
                held = v.kid in private
                assert held == (str(v.state) != "destroyed"), f"{v.kid} {v.state}: key {held}"
        print(
            f"crash rounds: {self.totals['rounds']}, signatures checked "
            f"{len(self.ledger.signed)}, versions {sum(len(v) for v in final.values())}, "
            f"intents left unpaired by the kills {self.totals['unpaired']}, "
            f"orphan kids skipped {self.logs_all().count('signerd.pkcs11.skip_orphan')}, "
            f"destroyed keys' leftovers removed {self.logs_all().count('destroyed_leftover')}, "
            f"records forwarded {len(self.trail())}, copies at the collector {copies}"
        )

    def trail(self) -> dict[str, bytes]:
        """Every record of the trail (every worker's file), by record id: its line."""
        lines: dict[str, bytes] = {}
        for path in sorted(self.daemon.audit_path.parent.glob("audit*.jsonl")):
            for line in path.read_bytes().splitlines():
                rid = str(json.loads(line)["record_id"])
                assert rid not in lines, f"record id {rid} twice in the trail"
                lines[rid] = line
        return lines

    def verify(self, audit_dir: str, *more: str) -> str:
        """``signerctl audit verify`` over the trail (and ``more``) passes; its output."""
        done = subprocess.run(
            [sys.executable, "-m", "signerd.cli", "audit", "verify", audit_dir, *more],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, f"SIGNERD_CRASH_SEED={self.seed}: {done.stdout}{done.stderr}"
        return done.stdout

    def settled(self, quiet: float = 0.3) -> None:
        """Until the trail has not grown for ``quiet`` seconds: the record of a success
        (a verify, a read) joins a write up to 50 ms after its answer."""
        last, since = set(self.trail()), time.monotonic()

        def still() -> bool:
            nonlocal last, since
            now = set(self.trail())
            if now != last:
                last, since = now, time.monotonic()
            return time.monotonic() - since >= quiet

        wait_until(still, 30, "the trail to settle", interval=0.05)

    def caught_up(self, heads: bool = True) -> bool:
        """Whether the collector holds every record of the trail (and, with ``heads``, a
        checkpoint of each chain's head)."""
        trail = self.trail()
        last = {
            path.name: int(json.loads(path.read_bytes().splitlines()[-1])["seq"])
            for path in self.daemon.audit_path.parent.glob("audit*.jsonl")
            if path.stat().st_size
        }
        got: set[str] = set()
        checkpointed = dict.fromkeys(last, 0)
        for m in self.collector.messages():
            if m.msgid == "audit":
                got.add(m.params["rid"])
            elif m.msgid == "checkpoint" and m.params["chain"] in last:
                chain = m.params["chain"]
                checkpointed[chain] = max(checkpointed[chain], int(m.params["seq"]))
        return set(trail) <= got and (not heads or checkpointed == last)

    def check_forwarded(self) -> int:
        """The collector holds every record of the trail, as the trail holds it, and nothing
        else; a record arrives twice only as docs/audit-forwarding.md allows: a forwarder
        killed with a batch answered but its position not yet saved sends that batch again
        (at most one batch per kill, identical copies). Returns how many copies arrived."""
        trail = self.trail()
        got = [m for m in self.collector.messages() if m.msgid == "audit"]
        assert {m.hostname for m in got} == {HOST}
        for m in got:
            assert m.msg == trail[m.params["rid"]], f"record {m.params['rid']} differs"
        counts = collections.Counter(m.params["rid"] for m in got)
        assert set(counts) == set(trail), "records the collector holds are not the trail's"
        copies = sum(n - 1 for n in counts.values())
        assert copies <= BATCH_RECORDS * self.forwarder_kills, (
            f"SIGNERD_CRASH_SEED={self.seed}: {copies} copies after "
            f"{self.forwarder_kills} kills of the forwarder"
        )
        return copies

    def logs_all(self) -> str:
        return "".join(
            self.base.joinpath(f"run{n}", "signerd.log").read_text(errors="replace")
            for n in range(1, self.starts + 1)
        )


@pytest.fixture
def crashes(tmp_path: Path, seed: int) -> Iterator[Crashes]:
    with Rsyslog(tmp_path / "collector", relp=True) as collector:
        c = Crashes(tmp_path, make_token(tmp_path / "softhsm", "crash"), seed, collector)
        try:
            yield c
        finally:
            c.daemon.stop(grace=5.0)


def _started_at(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_a_worker_mid_load_20_times(crashes: Crashes) -> None:
    """A worker killed mid-sign or mid-rotate is replaced and no acknowledged answer is lost."""

    def kill(d: SignerdProcess) -> None:
        victim = min(d.worker_pids(), key=_started_at)  # up the longest: slots take turns
        os.kill(victim, signal.SIGKILL)
        wait_until(
            lambda: len(d.worker_pids()) == 2 and victim not in d.worker_pids(),
            30,
            "a new worker",
        )

    for n in range(ROUNDS):
        crashes.round(n, kill)
    assert crashes.daemon.proc.poll() is None, "the supervisor kept running"
    crashes.finish()


def _restart_after(crashes: Crashes, kill: Callable[[SignerdProcess], None]) -> None:
    """Each round: ``kill``, wait for every process of the daemon to end, start it again."""

    def then_restart(d: SignerdProcess) -> None:
        pids = d.worker_pids() | {d.pid, d.forwarder_pid() or d.pid}
        kill(d)
        d.proc.wait(timeout=30)
        wait_until(lambda: not any(_alive(p) for p in pids), 30, "the daemon's processes to end")
        crashes.daemon = crashes.start()

    for n in range(ROUNDS):
        crashes.round(n, then_restart)
    crashes.finish()


def test_kill_9_of_the_supervisor_mid_load_20_times(crashes: Crashes) -> None:
    """The supervisor killed mid-load: workers finish every intent's outcome; no answer lost."""
    _restart_after(crashes, lambda d: os.kill(d.pid, signal.SIGKILL))
    assert crashes.totals["unpaired"] == 0, f"SIGNERD_CRASH_SEED={crashes.seed}"


def test_kill_9_of_the_whole_daemon_mid_load_20_times(crashes: Crashes) -> None:
    """Every process of the daemon killed at once mid-load: the next start loses no answer."""

    def kill(d: SignerdProcess) -> None:
        os.killpg(d.pid, signal.SIGKILL)  # the forwarder too: it is in the daemon's group
        crashes.forwarder_kills += 1

    _restart_after(crashes, kill)
