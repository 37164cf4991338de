"""/v1/ready on a real daemon: answers are reused briefly, and a token that cannot be read is not ready."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from signerd.testing import wait_until

from ..conftest import start_daemon
from ..support.rawhttp import request
from .test_keyring import KeepAlive, _counters, starved

pytestmark = pytest.mark.timeout(120)

PROBE_SECONDS = 2.0


def test_a_flood_of_readiness_probes_costs_one_round_trip_a_second(tmp_path: Path) -> None:
    """Hundreds of /v1/ready calls reach the token at most about once per second."""
    d = start_daemon(tmp_path / "d")
    sock = str(d.socket_path)
    statuses: list[int] = []
    try:
        stop = time.monotonic() + PROBE_SECONDS

        def probe() -> None:
            while time.monotonic() < stop:
                statuses.append(request(sock, "GET", "/v1/ready").status)

        threads = [threading.Thread(target=probe) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        d.stop()
    assert len(statuses) >= 50 and set(statuses) == {200}, (len(statuses), set(statuses))
    counters = _counters(d.log_text())
    assert 1 <= counters["ready_checks"] <= PROBE_SECONDS + 2, counters


def test_not_ready_while_the_token_cannot_be_read(tmp_path: Path) -> None:
    """With no fds to open the token's files the daemon is not ready; ready again afterwards."""
    d = start_daemon(tmp_path / "d", server={"workers": 1})  # one process to starve
    conn = KeepAlive(d.socket_path)
    try:
        assert conn("GET", "/v1/ready").status == 200
        with starved(d.proc.pid):
            wait_until(lambda: conn("GET", "/v1/ready").status == 503, 10, "not ready", 0.2)
            reply = conn("GET", "/v1/ready")
            assert reply.code == "backend_unavailable", reply.body
        wait_until(lambda: conn("GET", "/v1/ready").status == 200, 10, "ready", 0.2)
    finally:
        conn.close()
        d.stop()
