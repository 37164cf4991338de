"""Shared fixtures: a real SoftHSM token, a real signerd daemon, unique key names.

SoftHSM reads SOFTHSM2_CONF once per process (at C_Initialize), so the whole
test session shares one token directory, made here before anything loads the
PKCS#11 library; tests keep apart by using their own tenants and keys.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.testing import (
    SignerdProcess,
    allow_all,
    make_token,
    softhsm_module,
    start,
    to_toml,
    wait_until,
)

__all__ = ["to_toml", "wait_until"]  # re-exported for the tests

DaemonProcess = SignerdProcess
ROOT = Path(__file__).resolve().parent.parent
SOFTHSM_MODULE = softhsm_module()
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
    base = Path(tempfile.mkdtemp(prefix="signerd-test-"))
    token = make_token(base / "softhsm", TOKEN_LABEL)
    os.environ["SOFTHSM2_CONF"] = str(token.conf)
    return base


_BASE = _make_token_dir()
PIN_FILE = _BASE / "softhsm" / "pin"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_BASE, ignore_errors=True)


# Clients that run as other users need an interpreter they may execute (the test
# virtualenv usually lives under /root); they only use the standard library.
CHILD_PYTHON = "/usr/bin/python3"
NOBODY, NOGROUP, USERS_GID = 65534, 65534, 100


@contextlib.contextmanager
def shared_tmp_dir(prefix: str = "signerd-") -> Iterator[Path]:
    """A fresh directory under /tmp that other users can traverse (pytest's tmp_path is
    private to root), removed afterwards."""
    if not os.access(CHILD_PYTHON, os.X_OK):
        pytest.fail(f"{CHILD_PYTHON} is needed to run code as other users")
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """``shared_tmp_dir`` as a fixture."""
    with shared_tmp_dir() as base:
        yield base


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
    return allow_all(uid)


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
    """A daemon on the session's token, configured by ``daemon_config(base, **overrides)``."""
    return start(daemon_config(base, **overrides), base, wait=wait, cwd=ROOT)


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
    from .support.openbao import dev_server

    with dev_server(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture(scope="session")
def openbao_backend_config(openbao_dev: Any) -> dict[str, Any]:
    """A vault backend configuration table pointing at the session's OpenBao."""
    from .support.openbao import vault_backend_config

    return vault_backend_config(openbao_dev)
