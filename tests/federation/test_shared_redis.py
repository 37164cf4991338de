"""Two hosts sharing one real redis-server for nonces: replays across hosts, Redis crashes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonProcess, unique, wait_until
from ..support.federation import (
    Api,
    Producer,
    RedisServer,
    assert_replays_across,
    federation_daemon,
    redis_server,
)

#: the persistence docs/many-hosts.md recommends: every acknowledged nonce fsynced
DURABLE = ("--appendonly", "yes", "--appendfsync", "always")


def _hosts(tmp_path: Path, redis: RedisServer) -> tuple[DaemonProcess, DaemonProcess]:
    nonces = {"store": "redis", "url": redis.url, "prefix": f"signerd:{unique('sh')}:"}
    a = federation_daemon(tmp_path / "a", {"nonces": nonces}, server={"workers": 2})
    b = federation_daemon(tmp_path / "b", {"nonces": nonces}, server={"workers": 2})
    return a, b


@pytest.mark.timeout(120)
def test_an_envelope_accepted_through_one_host_is_a_replay_through_the_other(
    tmp_path: Path,
) -> None:
    """Accepted through host A, the same envelope is refused 409 replayed_nonce through host B."""
    with redis_server(tmp_path / "redis", *DURABLE) as redis:
        a, b = _hosts(tmp_path, redis)
        try:
            assert_replays_across(a, b, unique("sr"), "p-shared", rounds=20)
        finally:
            assert a.stop() == 0, a.log_text()[-2000:]
            assert b.stop() == 0, b.log_text()[-2000:]


@dataclass
class _Verdict:
    host: int
    envelope: dict[str, Any]
    started: float
    ended: float
    status: int
    code: str | None
    retry_after: str | None


@pytest.mark.timeout(240)
def test_redis_crash_under_load_refuses_meanwhile_and_never_accepts_a_replay(
    tmp_path: Path,
) -> None:
    """Redis killed -9 and restarted while two hosts verify: 503 nonce_store_unavailable (with
    Retry-After) only while it is down, and afterwards every envelope accepted before, during or
    after is refused as a replay through either host."""
    with redis_server(tmp_path / "redis", *DURABLE) as redis:
        hosts = _hosts(tmp_path, redis)
        try:
            tenant, p = unique("sc"), Producer.new("p-crash")
            for host in hosts:
                Api(host).trust(tenant, p)
            key = f"{tenant}/k"
            Api(hosts[0]).ok("POST", "/v1/keys", {"key": key}, status=201)
            verdicts: list[_Verdict] = []
            lock = threading.Lock()
            stop = threading.Event()

            def run(index: int) -> None:
                api = Api(hosts[index % 2])
                while not stop.is_set():
                    env = p.telemetry(tenant, f'{{"i":{index}}}'.encode())
                    started = time.monotonic()
                    reply = api("POST", "/v1/telemetry/verify", env)
                    verdict = _Verdict(
                        index % 2,
                        env,
                        started,
                        time.monotonic(),
                        reply.status,
                        reply.code,
                        reply.headers.get("retry-after"),
                    )
                    with lock:
                        verdicts.append(verdict)
                    stop.wait(0.02)

            threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
            for t in threads:
                t.start()
            wait_until(lambda: sum(v.status == 200 for v in verdicts) >= 40, timeout=30)
            killed_at = time.monotonic()
            redis.kill()
            wait_until(
                lambda: any(v.status == 503 and v.started > killed_at for v in verdicts),
                timeout=30,
            )
            signed = Api(hosts[1])("POST", "/v1/sign", {"key": key, "data": "eA=="})
            assert signed.status == 200, signed.body  # signing needs no Redis
            time.sleep(1.0)  # stay down a while under load (not synchronisation)
            restarting_at = time.monotonic()
            redis.start_again()
            back_at = time.monotonic()
            wait_until(
                lambda: sum(v.status == 200 and v.started > back_at for v in verdicts) >= 40,
                timeout=30,
            )
            stop.set()
            for t in threads:
                t.join(timeout=30)
            outcomes = Counter((v.status, v.code) for v in verdicts)
            assert set(outcomes) <= {(200, None), (503, "nonce_store_unavailable")}, outcomes
            for v in verdicts:
                if v.status == 503:
                    assert v.retry_after == "1"
                    assert killed_at <= v.ended and v.started <= back_at + 2.0, v
                if killed_at < v.started and v.ended < restarting_at:
                    assert v.status == 503, v  # nothing accepted while Redis is down
            accepted = [v for v in verdicts if v.status == 200]
            assert any(v.started < killed_at for v in accepted)
            assert any(v.started > back_at for v in accepted)
            for v in accepted:
                for host in hosts:  # both hosts, whoever accepted it
                    reply = Api(host)("POST", "/v1/telemetry/verify", v.envelope)
                    assert (reply.status, reply.code) == (409, "replayed_nonce"), v
            print(
                f"\n[redis] {len(accepted)} accepted, {outcomes[(503, 'nonce_store_unavailable')]}"
                f" refused 503 while Redis was down; {2 * len(accepted)} replays refused"
            )
        finally:
            rcs = [h.stop() for h in hosts]
            assert rcs == [0, 0], hosts[0].log_text()[-2000:] + hosts[1].log_text()[-2000:]
