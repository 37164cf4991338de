"""Shared fixtures: a real SoftHSM token, a real signerd daemon, unique key names.

SoftHSM reads SOFTHSM2_CONF once per process (at C_Initialize), so the whole
test session shares one token directory, made here before anything loads the
PKCS#11 library; tests keep apart by using their own tenants and keys.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
TOKEN_LABEL = "signerd-test"
_counter = itertools.count(1)


class OpenGate:
    """A gate that grants everything: for tests of what surrounds the policy."""

    def authorize(self, call: Any) -> None: ...

    def visible(self, peer: Any, op: Any, key: Any) -> bool:
        return True

    def admits(self, peer: Any) -> bool:
        return True

    def charge_refusal(self, peer: Any) -> None: ...

    def records_limited(self, peer: Any) -> bool:
        return True


def _make_token_dir() -> Path:
    if shutil.which("softhsm2-util") is None or not os.path.exists(SOFTHSM_MODULE):
        raise RuntimeError(
            "SoftHSM2 is not installed (apt-get install softhsm2); tests need the real token"
        )
    base = Path(tempfile.mkdtemp(prefix="signerd-test-"))
    out = subprocess.run(
        [str(ROOT / "softhsm" / "make-token.sh"), str(base / "softhsm"), TOKEN_LABEL],
        check=True,
        capture_output=True,
        text=True,
    )
    conf = out.stdout.strip().split("=", 1)[1]
    os.environ["SOFTHSM2_CONF"] = conf
    return base


_BASE = _make_token_dir()
PIN_FILE = _BASE / "softhsm" / "pin"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_BASE, ignore_errors=True)


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``check`` until it is true; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def unique(prefix: str = "t") -> str:
    """A tenant or key part no other test uses."""
    return f"{prefix}{os.getpid() % 1000}x{next(_counter)}"


@pytest.fixture
def tenant() -> str:
    return unique("tn")


def pkcs11_backend_config(token_label: str = TOKEN_LABEL) -> dict[str, Any]:
    return {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": token_label,
        "pin_file": str(PIN_FILE),
    }


def policy_allow_all(uid: int | None = None) -> dict[str, Any]:
    """A policy granting one uid (default: ours) every operation on every tenant."""
    return {
        "rules": [
            {
                "name": "test-admin",
                "uids": [os.getuid() if uid is None else uid],
                "tenants": ["*"],
                "operations": [
                    "sign",
                    "verify",
                    "jwks",
                    "list",
                    "create",
                    "rotate",
                    "promote",
                    "retire",
                    "destroy",
                ],
            }
        ]
    }


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for test configurations: tables of scalars, lists, inline tables, arrays of tables."""
    lines: list[str] = []

    def table(prefix: str, body: dict[str, Any]) -> None:
        scalars = {
            k: v for k, v in body.items() if not isinstance(v, dict) and not _is_table_array(v)
        }
        if prefix:
            lines.append(f"[{prefix}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in scalars.items())
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}" if prefix else k, v)
            elif _is_table_array(v):
                for item in v:
                    lines.append(f"[[{prefix}.{k}]]" if prefix else f"[[{k}]]")
                    lines.extend(f"{ik} = {toml_value(iv)}" for ik, iv in item.items())

    table("", doc)
    return "\n".join(lines) + "\n"


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(i, dict) for i in v)


@dataclass
class DaemonProcess:
    """A signerd daemon running as a child process on a real SoftHSM token."""

    dir: Path
    config_path: Path
    socket_path: Path
    audit_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    def worker_pids(self) -> set[int]:
        """The pids of the daemon's worker processes (empty when it runs as one process)."""
        pids: set[int] = set()
        for task in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in task.read_text().split())
        return pids

    def sighup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def daemon_config(base: Path, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "server": {"socket": str(base / "run" / "signerd.sock"), "log_level": "info"},
        "keys": {"default_backend": "hsm", "refresh_interval": 0},
        "backends": {"hsm": pkcs11_backend_config()},
        "audit": {"path": str(base / "audit" / "audit.jsonl"), "fsync": False},
        "policy": policy_allow_all(),
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(section), dict) and section != "policy":
            doc[section] = {**doc[section], **value}
        else:
            doc[section] = value
    return doc


def start_daemon(base: Path, *, wait: float = 30.0, **overrides: Any) -> DaemonProcess:
    base.mkdir(parents=True, exist_ok=True)
    doc = daemon_config(base, **overrides)
    config_path = base / "signerd.toml"
    config_path.write_text(to_toml(doc))
    socket_path = Path(doc["server"]["socket"])
    log_path = base / "signerd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "signerd", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            start_new_session=True,
        )
    d = DaemonProcess(base, config_path, socket_path, Path(doc["audit"]["path"]), log_path, proc)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"signerd exited with {proc.returncode}:\n{d.log_text()}")
        if socket_path.exists() and "signerd.ready" in d.log_text():
            return d
        time.sleep(0.05)
    d.stop()
    raise RuntimeError(f"signerd did not become ready in {wait}s:\n{d.log_text()}")


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the session (tests use their own tenants)."""
    d = start_daemon(tmp_path_factory.mktemp("daemon"))
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture
def fresh_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon of this test's own, for tests that signal or break it."""
    d = start_daemon(tmp_path / "d")
    yield d
    d.stop()


@pytest.fixture(scope="session")
def openbao_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real `bao server -dev` on a loopback port for the session."""
    from ._openbao import dev_server

    with dev_server(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(scope="session")
def openbao_backend_config(openbao_dev: Any) -> dict[str, Any]:
    """A vault backend configuration table pointing at the session's OpenBao."""
    from ._openbao import vault_backend_config

    return vault_backend_config(openbao_dev)
