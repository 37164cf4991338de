"""Signing domains under a real daemon: a hung domain and a flooding tenant stay alone.

A two-worker signerd serves two tenants, one on a SoftHSM token of this test's
own and one on a real OpenBao dev server. The token is hung (another process
holds locks on every file of its store, so ``C_Sign`` blocks inside the
library); the token's tenant gets its 503 while the OpenBao tenant keeps
signing at the speed it had before, with no error and no worker replaced, and
the metrics show that domain's backend down and the other up. A
tenant sending ten times the other's rate does not slow the other down.

The load comes from another process over kept-alive connections, as clients
send it; each p50 pools alternating rounds, so the machine's own load (other
work on a shared host) weighs on both sides of a comparison alike.
"""

from __future__ import annotations

import base64
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT, SOFTHSM_MODULE, DaemonProcess, start_daemon, unique, wait_until
from ..support.pkcs11_faults import held_token
from ..support.rawhttp import request

pytestmark = pytest.mark.timeout(240)


SAMPLES = 160  # signs per p50
ROUNDS = 8  # alternating rounds alone / under the condition
RATE = 20.0  # the steady tenant's signs per second
Signed = tuple[int, "str | None", float]  # status, error code, seconds


class _Domains:
    def __init__(self, d: DaemonProcess, tokens: Path) -> None:
        self.d, self.tokens = d, tokens
        self.hsm = f"{unique('hung')}/k"  # on the token
        self.bao = f"{unique('live')}/k"  # on OpenBao


@pytest.fixture
def domains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openbao_backend_config: dict[str, Any]
) -> Iterator[_Domains]:
    token = subprocess.run(
        [str(ROOT / "softhsm" / "make-token.sh"), str(tmp_path / "softhsm"), "domain"],
        check=True,
        capture_output=True,
        text=True,
    )
    monkeypatch.setenv("SOFTHSM2_CONF", token.stdout.strip().split("=", 1)[1])
    hsm = {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": "domain",
        "pin_file": str(tmp_path / "softhsm" / "pin"),
    }
    tenants = (unique("hung"), unique("live"))
    d = start_daemon(
        tmp_path / "d",
        server={"workers": 2},
        keys={"default_backend": "hsm", "refresh_interval": 0, "backend_timeout": 1.0},
        backends={"hsm": hsm, "bao": openbao_backend_config},
        tenants={tenants[0]: {"backend": "hsm"}, tenants[1]: {"backend": "bao"}},
    )
    dom = _Domains(d, tmp_path / "softhsm" / "tokens")
    dom.hsm, dom.bao = f"{tenants[0]}/k", f"{tenants[1]}/k"
    try:
        for key in (dom.hsm, dom.bao):
            assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        yield dom
    finally:
        d.stop()


def _sign(d: DaemonProcess, key: str, timeout: float = 20.0) -> Signed:
    started = time.perf_counter()
    reply = request(
        str(d.socket_path),
        "POST",
        "/v1/sign",
        {"key": key, "data": base64.b64encode(b"domain").decode()},
        timeout=timeout,
    )
    return reply.status, reply.code, time.perf_counter() - started


def _paced(d: DaemonProcess, key: str, n: int, rate: float) -> list[Signed]:
    """``n`` signs at ``rate`` per second (one at a time, each at its own slot)."""
    out = []
    start = time.perf_counter()
    for i in range(n):
        wait = start + i / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        out.append(_sign(d, key))
    return out


def _p50(results: list[Signed]) -> float:
    return statistics.median(t for _, _, t in results)


_LOAD = """
import base64, collections, json, sys, threading, time
from tests.support.rawhttp import _UnixConnection
path, key, threads, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop, lock, seen = threading.Event(), threading.Lock(), collections.Counter()
body = json.dumps({"key": key, "data": base64.b64encode(b"load").decode()}).encode()
slowest = [0.0]
def run():
    start, i = time.perf_counter(), 0
    conn = _UnixConnection(path, 20)  # one kept-alive connection per thread, as clients do
    while not stop.is_set():
        wait = start + i * threads / rate - time.perf_counter()
        if wait > 0:
            stop.wait(wait)
        i += 1
        t = time.perf_counter()
        conn.request("POST", "/v1/sign", body=body, headers={"Content-Type": "application/json"})
        reply = conn.getresponse()
        answer = json.loads(reply.read())
        code = answer["error"]["code"] if reply.status != 200 else None
        with lock:
            seen[f"{reply.status} {code}"] += 1
            slowest[0] = max(slowest[0], time.perf_counter() - t)
    conn.close()
workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
for w in workers:
    w.start()
print("started", flush=True)
sys.stdin.read()
stop.set()
for w in workers:
    w.join(30)
print(json.dumps({"seen": seen, "slowest": slowest[0]}), flush=True)
"""


class _Load:
    """Signs of ``key`` from another process (``threads`` threads, ``rate`` per second in
    all) until the block ends; ``seen`` counts the answers by status and code."""

    def __init__(self, d: DaemonProcess, key: str, threads: int, rate: float) -> None:
        self._args = [sys.executable, "-c", _LOAD, str(d.socket_path), key, str(threads), str(rate)]
        self.seen: dict[str, int] = {}
        self.slowest = 0.0

    def __enter__(self) -> _Load:
        self._proc = subprocess.Popen(
            self._args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._proc.stdout is not None and self._proc.stdout.readline() == "started\n"
        return self

    def __exit__(self, *exc: object) -> None:
        out, _ = self._proc.communicate("", timeout=60)
        result = json.loads(out)
        self.seen, self.slowest = result["seen"], result["slowest"]


def _compare(
    d: DaemonProcess, key: str, condition: Callable[[], contextlib.AbstractContextManager[Any]]
) -> tuple[list[Signed], list[Signed]]:
    """``key``'s signs at RATE alone and under ``condition``, in alternating rounds (so the
    machine's own load drifts into both sides alike)."""
    alone: list[Signed] = []
    under: list[Signed] = []
    _paced(d, key, 10, RATE)  # warm both workers' connections to the backend
    for _ in range(ROUNDS):
        alone += _paced(d, key, SAMPLES // ROUNDS, RATE)
        with condition():
            time.sleep(0.3)  # the condition takes hold
            under += _paced(d, key, SAMPLES // ROUNDS, RATE)
    return alone, under


def test_a_hung_domain_answers_503_while_the_other_signs_at_full_speed(domains: _Domains) -> None:
    """With the token hung, its tenant gets 503 backend_unavailable within the backend
    timeout; the OpenBao tenant's p50 stays within 1.2x of its p50 with the token well,
    with 0 errors and no worker replaced; signerd_backend_up is 0 for the token only."""
    d = domains.d
    workers = d.worker_pids()
    loads: list[_Load] = []

    metrics: list[str] = []

    @contextlib.contextmanager
    def hung() -> Iterator[None]:
        with held_token(domains.tokens), _Load(d, domains.hsm, threads=4, rate=8.0) as load:
            yield
            if not metrics:  # once, after the round's measurement: up/down per domain
                metrics.append(request(str(d.socket_path), "GET", "/metrics").body.decode())
        loads.append(load)

    well, during = _compare(d, domains.bao, hung)
    p_well, p_during = _p50(well), _p50(during)
    print(f"live tenant p50 token well={p_well * 1e3:.2f}ms hung={p_during * 1e3:.2f}ms")
    assert [s for s, _, _ in well + during if s != 200] == []
    seen: dict[str, int] = {}
    for load in loads:
        for answer, n in load.seen.items():
            seen[answer] = seen.get(answer, 0) + n
        assert load.slowest < 3.0  # backend_timeout is 1 s
    assert set(seen) == {"503 backend_unavailable"} and seen["503 backend_unavailable"] > 0
    assert p_during <= 1.2 * p_well, (p_well, p_during)
    assert 'signerd_backend_up{backend="hsm"} 0.0' in metrics[0]
    assert 'signerd_backend_up{backend="bao"} 1.0' in metrics[0]
    assert d.worker_pids() == workers
    assert "signerd.worker_stalled" not in d.log_text()
    wait_until(lambda: _sign(d, domains.hsm)[0] == 200, 30, "the token's tenant signing again")


def test_a_tenant_at_ten_times_the_rate_does_not_starve_the_other(domains: _Domains) -> None:
    """While one tenant signs at 10x the other's rate, the other's p50 stays within 1.5x
    of its p50 alone, with 0 errors on either side."""
    d = domains.d
    loads: list[_Load] = []

    @contextlib.contextmanager
    def flood() -> Iterator[None]:
        with _Load(d, domains.hsm, threads=4, rate=10 * RATE) as load:
            yield
        loads.append(load)

    alone, shared = _compare(d, domains.bao, flood)
    p_alone, p_shared = _p50(alone), _p50(shared)
    flooded = sum(sum(load.seen.values()) for load in loads)
    print(
        f"steady tenant p50 alone={p_alone * 1e3:.2f}ms with flood={p_shared * 1e3:.2f}ms "
        f"flood signs={flooded} steady signs={len(shared)}"
    )
    assert [s for s, _, _ in alone + shared if s != 200] == []
    assert all(set(load.seen) == {"200 None"} for load in loads)
    assert flooded >= 5 * len(shared)  # the flood really ran at several times the rate
    assert p_shared <= 1.5 * p_alone, (p_alone, p_shared)
