"""Run a real signerd in integration tests: a SoftHSM token, a configuration, the daemon.

signerd's own tests, benchmarks and examples use this module, and so can the
integration tests of a program that signs through signerd::

    token = make_token(tmp / "softhsm", "my-test")
    os.environ["SOFTHSM2_CONF"] = str(token.conf)  # or pass env=token.env() to start()
    config = {
        "server": {"socket": str(tmp / "signerd.sock"), "log_level": "info"},
        "keys": {"default_backend": "hsm", "bootstrap": ["acme/release"]},
        "backends": {"hsm": token.backend_config()},
        "audit": {"path": str(tmp / "audit.jsonl")},
        "policy": allow_all(),
    }
    with start(config, tmp) as daemon:
        Client(daemon.socket_path).sign("acme/release", b"data")

``start`` writes the configuration as TOML, runs ``python -m signerd --config``
with the interpreter running the caller (importing the same ``signerd``), and
returns once the daemon has logged ``signerd.ready`` (so ``log_level`` must be
``info`` or lower); ``SignerdProcess.stop`` sends SIGTERM, waits, then kills.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from .authz import Operation
from .workers import set_parent_death_signal

__all__ = [
    "ALL_OPERATIONS",
    "READY_LINE",
    "SOFTHSM_MODULES",
    "SignerdProcess",
    "SoftHSMToken",
    "StartFailed",
    "allow_all",
    "make_token",
    "softhsm_module",
    "start",
    "to_toml",
    "wait_until",
]

ALL_OPERATIONS: tuple[str, ...] = tuple(op.value for op in Operation if op is not Operation.HEALTH)
"""Every operation a policy rule can grant (health checks are never refused, so not listed)."""

READY_LINE = "signerd.ready"
"""What the daemon logs (at level info) once it serves: ``start`` waits for it."""

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
)

_T = TypeVar("_T")
_SOURCE = Path(__file__).resolve().parent.parent  # the directory this signerd is imported from


class StartFailed(RuntimeError):
    """A SoftHSM token could not be made, or signerd exited or was not ready in time."""


def wait_until(
    check: Callable[[], _T],
    timeout: float = 10.0,
    what: str = "a condition",
    interval: float = 0.05,
) -> _T:
    """Poll ``check`` until it returns something true and return that; AssertionError
    naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- SoftHSM ---


def softhsm_module() -> str:
    """The path of libsofthsm2.so; StartFailed when SoftHSM2 is not installed."""
    for path in SOFTHSM_MODULES:
        if os.path.exists(path):
            return path
    raise StartFailed("libsofthsm2.so not found (apt-get install softhsm2)")


@dataclass(frozen=True)
class SoftHSMToken:
    """A SoftHSM2 token in a directory of its own: its configuration file and user PIN file."""

    label: str
    module: str
    conf: Path  # what SOFTHSM2_CONF must name for a process to see the token
    pin_file: Path

    @property
    def pin(self) -> str:
        return self.pin_file.read_text().strip()

    def env(self) -> dict[str, str]:
        """The environment of this process, with SOFTHSM2_CONF naming this token's directory."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def backend_config(self) -> dict[str, Any]:
        """A ``[backends.NAME]`` table using this token."""
        return {
            "type": "pkcs11",
            "module": self.module,
            "token_label": self.label,
            "pin_file": str(self.pin_file),
        }


def _make_token_script() -> Path:
    script = _SOURCE / "softhsm" / "make-token.sh"
    if not script.exists():
        raise StartFailed(f"{script} not found: make_token needs a signerd source tree")
    return script


def make_token(directory: Path, label: str = "signerd-test") -> SoftHSMToken:
    """Token ``label`` in ``directory`` (made if absent), by ``softhsm/make-token.sh``:
    a random user PIN in ``directory/pin``, never on a command line."""
    if shutil.which("softhsm2-util") is None:
        raise StartFailed("softhsm2-util not found (apt-get install softhsm2)")
    module = softhsm_module()
    done = subprocess.run(
        [str(_make_token_script()), str(directory), label],
        env={**os.environ, "SOFTHSM2_MODULE": module},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise StartFailed(f"make-token.sh failed: {done.stderr.strip()}")
    conf = Path(done.stdout.strip().split("=", 1)[1])
    return SoftHSMToken(label, module, conf, conf.parent / "pin")


# --- configuration ---


def allow_all(uid: int | None = None, name: str = "test-admin") -> dict[str, Any]:
    """A ``[policy]`` table granting one uid (default: ours) every operation on every tenant."""
    return {
        "rules": [
            {
                "name": name,
                "uids": [os.getuid() if uid is None else uid],
                "tenants": ["*"],
                "operations": list(ALL_OPERATIONS),
            }
        ]
    }


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _key(key: str) -> str:
    """A TOML key: bare when it may be, else quoted (``"acme/*"``)."""
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(i, Mapping) for i in value)


def to_toml(doc: Mapping[str, Any]) -> str:
    """TOML for a configuration: tables of scalars and lists, nested tables, arrays of tables
    (a list of tables inside an array-of-tables item is written inline)."""
    lines: list[str] = []

    def table(prefix: str, body: Mapping[str, Any]) -> None:
        if prefix:
            lines.append(f"[{prefix}]")
        for k, v in body.items():
            if not isinstance(v, Mapping) and not _is_table_array(v):
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in body.items():
            name = f"{prefix}.{_key(k)}" if prefix else _key(k)
            if isinstance(v, Mapping):
                table(name, v)
            elif _is_table_array(v):
                for item in v:
                    lines.append(f"[[{name}]]")
                    lines.extend(f"{_key(ik)} = {_value(iv)}" for ik, iv in item.items())

    table("", doc)
    return "\n".join(lines) + "\n"


# --- the daemon ---


@dataclass
class SignerdProcess:
    """A signerd daemon running as a child process of this one."""

    dir: Path
    config: dict[str, Any]
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    ready_seconds: float = 0.0  # from spawn until the ready line was seen

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        return Path(self.config["server"]["socket"])

    @property
    def audit_path(self) -> Path:
        return Path(self.config["audit"]["path"])

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit_files(self) -> list[Path]:
        """The trail's files: audit.jsonl (one process) and each worker's audit.wN.jsonl."""
        stem, suffix = self.audit_path.stem, self.audit_path.suffix
        workers = sorted(self.audit_path.parent.glob(f"{stem}.w*{suffix}"))
        return ([self.audit_path] if self.audit_path.exists() else []) + workers

    def audit_bytes(self) -> bytes:
        """Every file of the trail, one after another."""
        return b"".join(p.read_bytes() for p in self.audit_files())

    def audit_records(self) -> list[dict[str, Any]]:
        """The records of every file of the trail, ordered by their time (stable)."""
        records = [
            json.loads(line)
            for p in self.audit_files()
            for line in p.read_bytes().splitlines()
            if line.strip()
        ]
        return sorted(records, key=lambda r: float(r.get("time", 0.0)))

    def _children(self) -> dict[int, list[bytes]]:
        """The daemon's child processes: pid -> command line (empty if it already ended)."""
        pids: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in task.read_text().split())
        found: dict[int, list[bytes]] = {}
        for pid in pids:
            with contextlib.suppress(OSError):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return found

    def worker_pids(self) -> set[int]:
        """The pids of the daemon's worker processes (empty when it runs as one process);
        the audit forwarder (``forwarder_pid``) is not one of them."""
        return {pid for pid, argv in self._children().items() if b"--forward" not in argv}

    def forwarder_pid(self) -> int | None:
        """The pid of the daemon's audit forwarder process (``signerd ... --forward``), if
        one runs."""
        return next((p for p, argv in self._children().items() if b"--forward" in argv), None)

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self, grace: float = 15.0) -> int:
        """SIGTERM, up to ``grace`` seconds for it to exit, then SIGKILL; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def __enter__(self) -> SignerdProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _die_with_parent() -> None:
    set_parent_death_signal(signal.SIGTERM)


def start(
    config: Mapping[str, Any],
    directory: Path,
    *,
    wait: float = 30.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
    interval: float = 0.05,
) -> SignerdProcess:
    """Write ``config`` to ``directory/signerd.toml`` and run signerd on it, its output in
    ``directory/signerd.log``; returns once it is ready (see the module's docstring).

    The daemon runs in a session of its own. ``die_with_parent`` has the kernel send it
    SIGTERM when the thread that called ``start`` ends (call it from the main thread).
    StartFailed, with the daemon's log, when it exits or is not ready within ``wait``.
    """
    level = str(config.get("server", {}).get("log_level", "info")).lower()
    if level in ("warning", "error", "critical"):
        raise ValueError(f"server.log_level {level!r} hides the {READY_LINE} line start waits for")
    directory.mkdir(parents=True, exist_ok=True)
    doc = copy.deepcopy(dict(config))
    config_path = directory / "signerd.toml"
    config_path.write_text(to_toml(doc))
    log_path = directory / "signerd.log"
    child_env = dict(os.environ if env is None else env)
    child_env["PYTHONPATH"] = os.pathsep.join(  # run the signerd this process imports
        p for p in (str(_SOURCE), child_env.get("PYTHONPATH")) if p
    )
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "signerd", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=None if cwd is None else str(cwd),
            env=child_env,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )
    daemon = SignerdProcess(directory, doc, config_path, log_path, proc)
    try:
        deadline = time.monotonic() + wait
        while True:
            if proc.poll() is not None:
                raise StartFailed(f"signerd exited with {proc.returncode}:\n{daemon.log_text()}")
            if daemon.socket_path.exists() and READY_LINE in daemon.log_text():
                daemon.ready_seconds = time.perf_counter() - started
                return daemon
            if time.monotonic() >= deadline:
                raise StartFailed(f"signerd was not ready within {wait}s:\n{daemon.log_text()}")
            time.sleep(interval)
    except BaseException:
        daemon.stop()  # never leave a half-started daemon behind
        raise
