"""The cluster backend's node and failovers, and the audit forwarder's lag and health, in
GET /metrics, GET /v1/status and ``signerctl status`` (real OpenBao, real rsyslogd)."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from signerd.client import Client
from signerd.testing import SignerdProcess

from ..cli.test_cli import run_ctl
from ..conftest import start_daemon, unique, wait_until
from ..forwarding.conftest import forwarding_daemon
from ..support.openbao import dev_server, vault_backend_config
from ..support.rsyslog import Rsyslog, wait_for
from .scrape import scrape, sign, status, value

pytestmark = pytest.mark.timeout(240)


def _dead_address() -> str:
    """A loopback URL nothing listens on (the port was just free)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_failovers_are_counted_and_the_answering_node_is_shown(tmp_path: Path) -> None:
    """A cluster backend whose first node is down fails over: signerd_backend_failovers_total
    counts every move the workers logged, and the node in use is in the metrics, the status
    document and signerctl status; a backend without nodes shows none, no forwarding series."""
    dead = _dead_address()
    with dev_server(tmp_path / "bao") as bao:
        table = vault_backend_config(bao, addr=[dead, bao.addr])
        daemon = start_daemon(
            tmp_path / "d",
            server={"workers": 2},
            keys={"bootstrap": ["vt/k"]},
            backends={"bao": table},
            tenants={"vt": {"backend": "bao"}},
        )
        try:

            def failed_over() -> float:
                assert sign(daemon, "vt/k").status == 200
                _, samples = scrape(daemon)
                return value(samples, "signerd_backend_failovers_total", backend="bao")

            wait_until(lambda: failed_over() >= 1, 60, "a failover counted")
            moves = f"signerd.vault.failover from={dead} to={bao.addr}"

            def counted() -> bool:  # the tick (1 s) has added every logged move
                _, samples = scrape(daemon)
                total = value(samples, "signerd_backend_failovers_total", backend="bao")
                return total == daemon.log_text().count(moves)

            wait_until(counted, 30, "every logged failover counted", 0.5)
            _, samples = scrape(daemon)
            assert value(samples, "signerd_backend_node", backend="bao", node=bao.addr) == 1.0
            assert not any(
                n == "signerd_backend_node" and dict(k)["backend"] == "hsm" for n, k in samples
            )
            assert (
                "signerd_backend_failovers_total",
                frozenset({("backend", "hsm")}),
            ) not in samples
            assert not any(n.startswith("signerd_audit_forwarding") for n, _ in samples)
            doc = status(daemon)
            nodes = {b["name"]: b["node"] for b in doc["backends"]}
            assert nodes == {"bao": bao.addr, "hsm": None}
            assert doc["audit"]["forwarding"] is None
            shown = run_ctl("--socket", str(daemon.socket_path), "status")
            assert shown.returncode == 0, shown.stderr
            row = next(
                line for line in shown.stdout.decode().splitlines() if line.startswith("bao ")
            )
            assert row.split()[-1] == bao.addr and "up" in row.split()
            assert "forward " not in shown.stdout.decode()
        finally:
            daemon.stop()


def _forwarder_pid(d: SignerdProcess) -> int:
    """The pid of the daemon's audit forwarder process (``signerd --forward``)."""
    config = str(d.config_path)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--forward" in argv and config.encode() in argv:
            return int(entry.name)
    raise AssertionError("no forwarder process")


def test_forwarding_lag_and_health_in_metrics_and_status(tmp_path: Path) -> None:
    """The forwarding gauges and status say healthy with lag 0 while the collector keeps up,
    show the lag growing while it is down, and once the forwarder is silent the status is
    degraded naming it and signerctl status shows it and exits 1."""
    key = f"{unique('fl')}/k"
    with (
        Rsyslog(tmp_path / "collector") as collector,
        forwarding_daemon(tmp_path / "d", collector) as d,
        Client(d.socket_path) as c,
    ):
        c.create_key(key)
        c.sign(key, b"first")
        wait_for(collector, 2)

        def lag() -> float | None:
            _, samples = scrape(d)
            if ("signerd_audit_forwarding_lag_bytes", frozenset()) not in samples:
                return None
            return value(samples, "signerd_audit_forwarding_lag_bytes")

        # each scrape and status request has its own record, queued once it is answered: the
        # next request may find it not yet forwarded, so each view is asked until it is at 0
        wait_until(lambda: lag() == 0.0, 60, "forwarding caught up", 0.25)
        _, samples = scrape(d)
        assert value(samples, "signerd_audit_forwarding_healthy") == 1.0
        assert 0 <= value(samples, "signerd_audit_forwarding_heartbeat_age_seconds") < 30

        def status_at_zero() -> dict[str, Any] | None:
            fwd = status(d)["audit"]["forwarding"]
            return fwd if fwd["lag_bytes"] == 0 else None

        def shown_at_zero() -> str | None:
            shown = run_ctl("--socket", str(d.socket_path), "status").stdout.decode()
            return shown if "forward healthy, lag 0 bytes, looked" in shown else None

        fwd = wait_until(status_at_zero, 60, "status says caught up", 0.25)
        assert fwd is not None and fwd["healthy"] and not fwd["refusing"], fwd
        wait_until(shown_at_zero, 60, "signerctl status says caught up", 0.25)
        collector.stop()

        def lagging() -> bool:
            c.sign(key, b"while the collector is down")
            found = lag()
            return found is not None and found > 0

        wait_until(lagging, 60, "a forwarding lag", 0.25)
        assert status(d)["audit"]["forwarding"]["lag_bytes"] > 0
        forwarder = _forwarder_pid(d)
        os.kill(forwarder, signal.SIGSTOP)
        try:
            wait_until(lambda: not status(d)["audit"]["forwarding"]["healthy"], 90, "silent", 0.5)
            _, samples = scrape(d)
            assert value(samples, "signerd_audit_forwarding_healthy") == 0.0
            assert value(samples, "signerd_audit_forwarding_heartbeat_age_seconds") > 30
            doc = status(d)
            assert "audit forwarding is past its bound or silent" in doc["problems"]
            degraded = run_ctl("--socket", str(d.socket_path), "status")
            assert degraded.returncode == 1
            assert "forward SILENT, lag " in degraded.stdout.decode()
            as_json = run_ctl("--socket", str(d.socket_path), "--json", "status")
            assert json.loads(as_json.stdout)["audit"]["forwarding"]["healthy"] is False
        finally:
            os.kill(forwarder, signal.SIGCONT)
        collector.start()
