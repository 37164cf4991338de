"""signerd's systemd glue on this host, without a booted systemd.

sd_notify lines and the watchdog (pings stop while the loop is blocked), the
activated socket (through systemd-socket-activate, which passes $LISTEN_FDS
as systemd does), credentials in the configuration, exit 78 for
configuration errors, and the journal fields of request events.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd._config import ConfigError, credential_path, parse
from signerd.client import Client
from signerd.daemon import _journal, _systemd
from signerd.server import log_request, log_requests_to_journal
from signerd.wire import MESSAGE_IDS

from ..conftest import ROOT, daemon_config, pkcs11_backend_config, to_toml

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _drain(sock: socket.socket) -> list[str]:
    got = []
    while True:
        try:
            got.append(sock.recv(4096).decode())
        except BlockingIOError:
            return got


def test_notify_sends_one_datagram(notify_socket: socket.socket) -> None:
    """notify() sends its lines as one datagram, newlines inside a line flattened."""
    assert _systemd.notify("READY=1", "STATUS=two\nlines")
    assert _drain(notify_socket) == ["READY=1\nSTATUS=two lines"]


def test_notify_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET notify() is a no-op that says so."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not _systemd.notify("READY=1")


def test_watchdog_interval_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Half of $WATCHDOG_USEC; none when unset, malformed or meant for another pid."""
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert _systemd.watchdog_interval() == 5.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert _systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for bad in ("", "0", "-5", "10s", "1e6"):
        monkeypatch.setenv("WATCHDOG_USEC", bad)
        assert _systemd.watchdog_interval() is None


async def test_watchdog_pings_stop_while_loop_is_blocked(notify_socket: socket.socket) -> None:
    """WATCHDOG=1 comes from the event loop: none while it is blocked, again once it runs."""
    dog = _systemd.Watchdog(0.02)
    dog.start()
    try:
        await asyncio.sleep(0.2)
        assert len(_drain(notify_socket)) >= 4
        time.sleep(0.3)  # the loop is stalled: nothing may ping
        assert _drain(notify_socket) == []
        await asyncio.sleep(0.1)
        assert "WATCHDOG=1" in _drain(notify_socket)
    finally:
        await dog.stop()
    await asyncio.sleep(0.05)
    _drain(notify_socket)
    await asyncio.sleep(0.1)
    assert _drain(notify_socket) == []


def test_credential_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credential names resolve in $CREDENTIALS_DIRECTORY; path-like names and a missing directory are refused."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert credential_path("signerd-pin") == str(tmp_path / "signerd-pin")
    for bad in ("", "../pin", "a/b", ".", "..", "-x", "x" * 300):
        with pytest.raises(ValueError):
            credential_path(bad)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ValueError, match="LoadCredential"):
        credential_path("pin")


def _doc(pin_file: str) -> dict[str, Any]:
    return {
        "backends": {"hsm": {**pkcs11_backend_config(), "pin_file": pin_file}},
        "audit": {"path": "/tmp/x.jsonl"},
    }


def test_config_resolves_credential_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pin_file = "credential:pin" is $CREDENTIALS_DIRECTORY/pin; errors name the key."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert parse(_doc("credential:pin")).backends["hsm"]["pin_file"] == str(tmp_path / "pin")
    with pytest.raises(ConfigError, match=r"backends\.hsm\.pin_file: not a credential name"):
        parse(_doc("credential:../etc/shadow"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match=r"backends\.hsm\.pin_file: .*CREDENTIALS_DIRECTORY"):
        parse(_doc("credential:pin"))


def _write_config(tmp_path: Path, **overrides: Any) -> tuple[Path, dict[str, Any]]:
    doc = daemon_config(tmp_path, **overrides)
    path = tmp_path / "signerd.toml"
    path.write_text(to_toml(doc))
    return path, doc


def _run_signerd(config: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "signerd", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=45,
        cwd=str(ROOT),
        env={**os.environ, **env},
        check=False,
    )


def test_wrong_pin_exits_78_with_one_clear_line(tmp_path: Path) -> None:
    """A PIN the token refuses at start is a configuration error: exit 78, one line, no PIN."""
    pin = tmp_path / "wrong.pin"
    pin.write_text("Wr0ng-pin-zq\n")
    config, _ = _write_config(
        tmp_path, backends={"hsm": {**pkcs11_backend_config(), "pin_file": str(pin)}}
    )
    done = _run_signerd(config)
    assert done.returncode == 78, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("signerd: ")]
    assert lines == [
        "signerd: configuration error: the token refused the login (PinIncorrect); not retrying"
    ]
    assert "Wr0ng" not in done.stderr


def test_missing_credential_and_bad_key_exit_78(tmp_path: Path) -> None:
    """A credential that is not there and an unknown key in the TOML both exit 78."""
    config, _ = _write_config(
        tmp_path, backends={"hsm": {**pkcs11_backend_config(), "pin_file": "credential:pin"}}
    )
    done = _run_signerd(config, CREDENTIALS_DIRECTORY=str(tmp_path / "creds"))
    assert done.returncode == 78, done.stderr
    assert "not retrying" in done.stderr
    config.write_text(config.read_text() + "\n[server2]\nx = 1\n")
    done = _run_signerd(config)
    assert done.returncode == 78 and "server2: unknown top-level key" in done.stderr


def _activate(config: Path, listen: Path, notify: Path) -> subprocess.Popen[str]:
    """signerd under systemd-socket-activate: the socket is bound first, signerd runs on the first connection."""
    return subprocess.Popen(
        [
            "systemd-socket-activate",
            "-l",
            str(listen),
            "--fdname=signerd",
            "-E",
            "PATH",
            "-E",
            "SOFTHSM2_CONF",
            "-E",
            f"NOTIFY_SOCKET={notify}",
            sys.executable,
            "-m",
            "signerd",
            "--config",
            str(config),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
        start_new_session=True,
    )


def _stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    out, _ = proc.communicate(timeout=10)
    return out


def test_activated_socket_is_served(tmp_path: Path, notify_socket: socket.socket) -> None:
    """signerd serves the socket it is passed ($LISTEN_FDS), tells READY=1 and STATUS=, and leaves the file to its owner."""
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    config, doc = _write_config(tmp_path)
    listen = Path(doc["server"]["socket"])
    notify = notify_socket.getsockname()
    proc = _activate(config, listen, Path(notify))
    try:
        deadline = time.monotonic() + 10
        while not listen.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        listen.chmod(0o660)  # what SocketMode=0660 does (systemd-socket-activate follows the umask)
        client = Client(str(listen), timeout=30)
        assert client.health() == "ok"
        messages = ""
        deadline = time.monotonic() + 30  # READY=1 comes once every worker is up
        while "READY=1" not in messages and time.monotonic() < deadline:
            messages += "\n".join(_drain(notify_socket))
            time.sleep(0.05)
        assert "READY=1" in messages and "STATUS=serving" in messages
    finally:
        out = _stop(proc)
    assert "activated=yes" in out, out
    assert "STOPPING=1" in "\n".join(_drain(notify_socket))


def test_activated_socket_at_another_path_is_refused(tmp_path: Path) -> None:
    """A passed socket whose path is not server.socket is a configuration error: exit 78 naming ListenStream=."""
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    config, _ = _write_config(tmp_path)
    other = run / "other.sock"
    proc = _activate(config, other, tmp_path / "no-notify")
    try:
        deadline = time.monotonic() + 10
        while not other.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(other))
        assert proc.wait(timeout=30) == 78
    finally:
        out = _stop(proc)
    assert "server.socket must equal ListenStream=" in out, out


def test_journal_handler_sends_upper_case_fields() -> None:
    """A request event reaches the journal with SIGNERD_REQUEST_ID, _OPERATION, _OUTCOME, _STATUS, its MESSAGE_ID and nothing lower-case."""
    sent: list[tuple[str, dict[str, str]]] = []
    handler = _journal.JournalHandler(lambda msg, **kw: sent.append((msg, kw)))
    logger = logging.getLogger("signerd.request")
    logger.addHandler(handler)
    log_requests_to_journal(True)
    try:
        logger.setLevel(logging.INFO)
        log_request("rid-1", "sign", "ok", 200)
    finally:
        log_requests_to_journal(False)
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert len(sent) == 1
    msg, fields = sent[0]
    assert msg.startswith("signerd.request rid=rid-1")
    names = ("SIGNERD_REQUEST_ID", "SIGNERD_OPERATION", "SIGNERD_OUTCOME", "SIGNERD_STATUS")
    assert {k: fields[k] for k in names} == {
        "SIGNERD_REQUEST_ID": "rid-1",
        "SIGNERD_OPERATION": "sign",
        "SIGNERD_OUTCOME": "ok",
        "SIGNERD_STATUS": "200",
    }
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["request"]
    assert fields["SYSLOG_IDENTIFIER"] == "signerd" and fields["PRIORITY"] == "6"
    assert all(k == k.upper() for k in fields)


def test_request_events_on_stderr_only_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Without the journal a request event is a debug line, so a busy daemon does not flood stderr."""
    with caplog.at_level(logging.INFO, logger="signerd.request"):
        log_request("rid-2", "sign", "ok", 200)
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger="signerd.request"):
        log_request("rid-3", "sign", "ok", 200)
    assert [r.getMessage() for r in caplog.records] == [
        "signerd.request rid=rid-3 op=sign outcome=ok status=200"
    ]


def test_activated_socket_open_to_others_is_refused(tmp_path: Path) -> None:
    """A passed socket file with bits for others (umask 022) is refused like a bound one would be."""
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    config, doc = _write_config(tmp_path)
    listen = Path(doc["server"]["socket"])
    proc = _activate(config, listen, tmp_path / "no-notify")
    try:
        deadline = time.monotonic() + 10
        while not listen.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert listen.stat().st_mode & 0o007  # the umask (022) leaves bits for others
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(listen))
        assert proc.wait(timeout=30) == 78
    finally:
        out = _stop(proc)
    assert "grants access to others" in out, out
