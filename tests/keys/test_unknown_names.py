"""Unknown key names are answered from the cache with one shared re-read per interval, on a real daemon."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from pathlib import Path

import pytest

from signerd.backends.pkcs11 import from_config
from signerd.wire import KeyName

from ..conftest import pkcs11_backend_config, start_daemon, unique
from ..support.rawhttp import request

pytestmark = pytest.mark.timeout(120)

FLOOD_SECONDS = 3.0
FLOODERS = 24


def _sign(sock: str, key: str) -> tuple[int, str | None, float]:
    started = time.monotonic()
    reply = request(sock, "POST", "/v1/sign", {"key": key, "data": base64.b64encode(b"m").decode()})
    return reply.status, reply.code, time.monotonic() - started


def _counters(log: str) -> dict[str, int]:
    line = [x for x in log.splitlines() if "signerd.keys.counters" in x][-1]
    fields = line.split("signerd.keys.counters", 1)[1]  # after the ts=, level=, logger= prefix
    return {k: int(v) for k, v in (f.split("=") for f in fields.split() if "=" in f)}


def test_a_flood_of_random_names_costs_one_reread_per_interval(tmp_path: Path) -> None:
    """Hundreds of signs of made-up names: no per-name token search, at most ~1 listing a second."""
    d = start_daemon(tmp_path / "d")
    sock = str(d.socket_path)
    tenant = unique("un")
    honest = f"{tenant}/honest"
    try:
        assert request(sock, "POST", "/v1/keys", {"key": honest}).status == 201
        answers: list[tuple[int, str | None]] = []
        honest_answers: list[int] = []
        stop = time.monotonic() + FLOOD_SECONDS

        def flood() -> None:
            while time.monotonic() < stop:
                status, code, _ = _sign(sock, f"{tenant}/r{secrets.token_hex(6)}")
                answers.append((status, code))

        def sign_honestly() -> None:
            while time.monotonic() < stop:
                honest_answers.append(_sign(sock, honest)[0])
                time.sleep(0.02)

        threads = [threading.Thread(target=flood) for _ in range(FLOODERS)]
        threads.append(threading.Thread(target=sign_honestly))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert len(answers) >= FLOODERS, len(answers)
        assert set(answers) == {(404, "unknown_key")}
        assert honest_answers and set(honest_answers) == {200}
    finally:
        d.stop()
    counters = _counters(d.log_text())
    assert counters["key_reads"] == 0, counters  # never one search per unknown name
    assert counters["shared_rereads"] <= FLOOD_SECONDS + 2, counters
    assert counters["keyring_reads"] <= 1 + counters["shared_rereads"], counters


def test_a_key_created_elsewhere_signs_at_the_first_request(tmp_path: Path) -> None:
    """A key another process put on the token is found by the shared re-read, not refused."""
    d = start_daemon(tmp_path / "d")
    try:
        key = KeyName(unique("ue"), "feedback")
        backend = from_config(pkcs11_backend_config())
        try:
            backend.create(key)
        finally:
            backend.close()
        status, code, _ = _sign(str(d.socket_path), f"{key.tenant}/{key.name}")
        assert (status, code) == (200, None)
    finally:
        d.stop()
