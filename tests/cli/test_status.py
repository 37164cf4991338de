"""``signerctl status`` against real signerd daemons (SoftHSM): the screen, --json, --watch
and the exit status (0 healthy, 1 degraded, sysexits when signerd cannot be reached)."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..conftest import DaemonProcess, start_daemon
from ..metrics.scrape import scrape, sign, status, value
from .test_cli import run_ctl

pytestmark = pytest.mark.timeout(240)

CLEAR = "\x1b[H\x1b[2J"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(
        tmp_path_factory.mktemp("healthy"),
        server={"workers": 2},
        keys={"bootstrap": ["st/a"], "max_active_age": {"st/*": 1e9}},
    )
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture(scope="module")
def overdue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon whose old/k is past its max_active_age from the start (new/k is not)."""
    d = start_daemon(
        tmp_path_factory.mktemp("overdue"),
        server={"workers": 2},
        keys={"bootstrap": ["old/k", "new/k"], "max_active_age": {"old/*": 0.001, "*/*": 1e9}},
    )
    yield d
    assert d.stop() == 0, d.log_text()


def _ctl(d: DaemonProcess, *argv: str) -> tuple[int, str]:
    done = run_ctl("--socket", str(d.socket_path), *argv)
    return done.returncode, done.stdout.decode()


def test_a_healthy_daemon_exits_0_with_every_section(healthy: DaemonProcess) -> None:
    """Backends, keys with their due date, audit, nonces and both workers are on the screen."""
    code, out = _ctl(healthy, "status")
    assert code == 0, out
    assert "HEALTHY" in out.splitlines()[0]
    assert "hsm" in out and "pkcs11" in out and " up" in out
    assert "st/a" in out and "st.a.v1" in out and "active=1" in out and "OVERDUE" not in out
    assert "audit   healthy, " in out and "nonces  sqlite" in out
    pids = {w["pid"] for w in status(healthy)["workers"]}
    assert len(pids) == 2 and all(str(p) in out for p in pids)
    assert healthy.worker_pids() == pids


def test_json_is_the_status_document(healthy: DaemonProcess) -> None:
    """--json prints GET /v1/status's document: keys with their rotation due date, workers."""
    code, out = _ctl(healthy, "--json", "status")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "healthy" and doc["problems"] == []
    (key,) = [k for k in doc["keys"] if k["key"] == "st/a"]
    assert key["active_kid"] == "st.a.v1" and key["versions"] == {"active": 1}
    assert key["rotation_due_at"] == key["active_created_at"] + 1e9 and not key["overdue"]
    assert [w["index"] for w in doc["workers"]] == [0, 1]
    assert all(w["restarts"] == 0 for w in doc["workers"])
    assert doc["backends"] == [
        {"name": "hsm", "type": "pkcs11", "up": True, "code": None, "node": None}
    ]
    assert doc["audit"]["forwarding"] is None


def test_an_overdue_key_is_flagged_and_exits_1(overdue: DaemonProcess) -> None:
    """A key past max_active_age: OVERDUE on the screen, a problem, exit 1, overdue 1 in the
    metrics; readiness is not affected and the key still signs."""
    code, out = _ctl(overdue, "status")
    assert code == 1, out
    assert "DEGRADED" in out.splitlines()[0]
    (line,) = [x for x in out.splitlines() if x.startswith("old/k ")]
    assert "OVERDUE" in line
    (line,) = [x for x in out.splitlines() if x.startswith("new/k ")]
    assert "OVERDUE" not in line
    assert "key old/k is past its max_active_age" in out
    assert status(overdue)["problems"] == ["key old/k is past its max_active_age"]
    _, samples = scrape(overdue)
    assert value(samples, "signerd_key_rotation_overdue", key="old/k") == 1.0
    assert value(samples, "signerd_key_rotation_overdue", key="new/k") == 0.0
    assert run_ctl("--socket", str(overdue.socket_path), "ready").returncode == 0
    signed = run_ctl("--socket", str(overdue.socket_path), "sign", "old/k", "--data-b64", "eA==")
    assert signed.returncode == 0


def test_watch_redraws_in_place(healthy: DaemonProcess) -> None:
    """--watch --count 3 clears the screen before each of its three frames, with the chart of
    the signs made meanwhile under the last; with --json it prints one document per line."""
    stop = threading.Event()

    def signing() -> None:
        while not stop.is_set():
            assert sign(healthy, "st/a").status == 200

    signer = threading.Thread(target=signing)
    signer.start()
    try:
        code, out = _ctl(healthy, "status", "--watch", "--interval", "0.5", "--count", "3")
    finally:
        stop.set()
        signer.join(timeout=30)
    assert code == 0
    assert out.count(CLEAR) == 3 and out.startswith(CLEAR)
    last = out.split(CLEAR)[-1].splitlines()
    (rate,) = [x for x in last if x.startswith("sign rate")]
    assert float(rate.rsplit(" ", 1)[1].removesuffix("/s").replace(",", "")) > 0
    assert any(x.startswith("sign p99") and x.endswith("s") for x in last)
    code, out = _ctl(healthy, "--json", "status", "--watch", "--interval", "0.1", "--count", "2")
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 2 and all(json.loads(x)["status"] == "healthy" for x in lines)


def test_an_unreachable_daemon_is_ex_unavailable(tmp_path: Path) -> None:
    """No daemon on the socket: exit 69 (EX_UNAVAILABLE), connection_failed on stderr."""
    done = run_ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert done.returncode == os.EX_UNAVAILABLE
    assert b"connection_failed" in done.stderr
