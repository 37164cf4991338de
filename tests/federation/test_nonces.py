"""Nonce stores against the real thing: SQLite files and a real redis-server the tests start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.errors import NonceStoreUnavailable, ReplayedNonce
from signerd.federation._nonces import SqliteNonceStore
from signerd.federation._redis_store import RedisNonceStore

from ..conftest import DaemonProcess, unique, wait_until
from ..support.federation import (
    Api,
    Producer,
    RedisServer,
    b64,
    federation_daemon,
    post_each,
    post_many,
    redis_server,
)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _one_winner(results: list[tuple[int, str | None]]) -> None:
    counts = Counter(results)
    assert counts == {(200, None): 1, (409, "replayed_nonce"): 999}, counts


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_thousand_concurrent_verifications_one_winner(
    tmp_path: Path, redis: RedisServer, store: str
) -> None:
    """1,000 concurrent verifications of one envelope: exactly one 200 and 999 replayed_nonce."""
    nonces = {"store": store, "url": redis.url, "timeout": 5.0}
    d = federation_daemon(tmp_path / "d", {"nonces": nonces})
    try:
        api = Api(d)
        tenant = unique("cc")
        p = Producer.new("p-concurrent")
        api.trust(tenant, p)
        env = p.telemetry(tenant, b'{"n":1}')
        results = asyncio.run(post_many(api.sock, "/v1/telemetry/verify", env, 1000))
        _one_winner(results)
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.timeout(120)
def test_accepted_before_kill_9_is_refused_after_restart(tmp_path: Path) -> None:
    """An envelope answered 200 just before SIGKILL is a replay (409) for the restarted daemon."""
    base = tmp_path / "d"
    d = federation_daemon(base)
    tenant = unique("k9")
    p = Producer.new("p-kill")
    envs = [p.telemetry(tenant, b"{}") for _ in range(20)]
    try:
        api = Api(d)
        api.trust(tenant, p)
        for env in envs:
            api.ok("POST", "/v1/telemetry/verify", env)
        os.killpg(d.proc.pid, signal.SIGKILL)
        d.proc.wait(timeout=10)
    finally:
        d.stop()
    d2 = federation_daemon(base)
    try:
        api = Api(d2)
        for env in envs:
            reply = api("POST", "/v1/telemetry/verify", env)
            assert (reply.status, reply.code) == (409, "replayed_nonce"), reply.body
        assert [k["kid"] for k in api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"]] == [
            p.kid
        ]
    finally:
        d2.stop()


def _verify_each(api: Api, envs: list[dict[str, str]]) -> Counter[tuple[int, str | None]]:
    return Counter(asyncio.run(post_each(api.sock, "/v1/telemetry/verify", envs)))


def _by_worker(d: DaemonProcess, operation: str) -> dict[str, int]:
    """Audit records of ``operation`` in each worker's file."""
    needle = f'"operation":"{operation}"'.encode()
    return {
        p.name: sum(needle in line for line in p.read_bytes().splitlines()) for p in d.audit_files()
    }


def _served_by_both(d: DaemonProcess, operation: str) -> dict[str, int]:
    """``_by_worker`` once both workers' files hold such a record (a success's record joins
    a write up to 50 ms after its answer); AssertionError after 10 s."""

    def both() -> dict[str, int]:
        served = _by_worker(d, operation)
        return served if len(served) == 2 and all(served.values()) else {}

    return wait_until(both, 10, f"{operation} records from both workers")


def _fill_to_the_bounds(d: DaemonProcess, prefix: str) -> list[str]:
    """Four tenants' envelopes against max_entries 40 and max_entries_per_tenant 15: the first
    tenant fills its share, the next still gets its own, the third the rest of the total, the
    fourth none (503 with Retry-After); an accepted nonce stays a replay (409). The tenants."""
    api = Api(d)
    tenants = [unique(prefix) for _ in range(4)]
    producers = [Producer.new(f"p-{t}") for t in tenants]
    for tenant, p in zip(tenants, producers, strict=True):
        api.trust(tenant, p)

    def flood(i: int, n: int) -> Counter[tuple[int, str | None]]:
        return _verify_each(api, [producers[i].telemetry(tenants[i], b"{}") for _ in range(n)])

    full = (503, "nonce_store_unavailable")
    accepted = producers[0].telemetry(tenants[0], b"{}")
    api.ok("POST", "/v1/telemetry/verify", accepted)
    assert flood(0, 59) == {(200, None): 14, full: 45}  # the first tenant fills its share
    assert flood(1, 30) == {(200, None): 15, full: 15}  # the next one still gets its own
    assert flood(2, 30) == {(200, None): 10, full: 20}  # 40 in all: the total bound
    assert flood(3, 5) == {full: 5}
    reply = api("POST", "/v1/telemetry/verify", producers[3].telemetry(tenants[3], b"{}"))
    assert (reply.status, reply.code, reply.headers.get("retry-after")) == (*full, "1")
    reply = api("POST", "/v1/telemetry/verify", accepted)
    assert (reply.status, reply.code) == (409, "replayed_nonce")
    return tenants


@pytest.mark.timeout(180)
def test_sqlite_bounds_hold_for_the_daemon_as_a_whole(tmp_path: Path) -> None:
    """Two workers: at most max_entries live nonces in all and max_entries_per_tenant for each
    tenant; a tenant at its share leaves the others theirs; a full store answers 503 with
    Retry-After, and accepted nonces stay replays (409)."""
    nonces = {"max_entries": 40, "max_entries_per_tenant": 15}
    d = federation_daemon(tmp_path / "d", {"nonces": nonces}, server={"workers": 2})
    try:
        tenants = _fill_to_the_bounds(d, "nb")
        path = tmp_path / "d" / "state" / "nonces.sqlite3"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = dict(conn.execute("SELECT tenant, COUNT(*) FROM seen GROUP BY tenant"))
        assert [rows.get(t, 0) for t in tenants] == [15, 15, 10, 0] and len(rows) == 3
        served = _served_by_both(d, "verify")  # both workers recorded nonces in the one file
        assert sorted(served) == ["audit.w0.jsonl", "audit.w1.jsonl"], served
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_one_key_under_several_labels_accepts_an_envelope_once(
    tmp_path: Path, redis: RedisServer, store: str
) -> None:
    """Nonces are unique per public key: with one key trusted for demo, for acme and under a
    second kid (allow_shared_keys), an envelope accepted for one label is a replay under every
    other, also for signerd's own key, and concurrently across workers exactly one is accepted."""
    nonces = {"store": store, "url": redis.url, "prefix": f"signerd:{unique('px')}:"}
    d = federation_daemon(tmp_path / "d", {"nonces": nonces, "allow_shared_keys": True})
    try:
        api = Api(d)
        demo, acme = unique("demo"), unique("acme")
        p = Producer.new("p-shared")
        second = Producer("p-shared-2", p.key)
        api.trust(demo, p)
        api.trust(acme, p)
        api.trust(demo, second)
        env = p.telemetry(demo, b'{"n":1}')
        api.ok("POST", "/v1/telemetry/verify", env)
        for label in ({"tenant": acme}, {"kid": second.kid}):
            reply = api("POST", "/v1/telemetry/verify", {**env, **label})
            assert (reply.status, reply.code) == (409, "replayed_nonce"), reply.body
        env = p.telemetry(acme, b'{"n":2}')  # the other way round
        api.ok("POST", "/v1/telemetry/verify", env)
        reply = api("POST", "/v1/telemetry/verify", {**env, "tenant": demo})
        assert (reply.status, reply.code) == (409, "replayed_nonce"), reply.body

        own = f"{demo}/telemetry"  # signerd's own key, its public key also trusted for acme
        api.ok("POST", "/v1/keys", {"key": own}, status=201)
        signed = api.ok("POST", "/v1/telemetry/sign", {"key": own, "body": b64(b"{}")})
        x = api.ok("GET", f"/v1/kids/{signed['kid']}")["jwk"]["x"]
        copy = {"tenant": acme, "kid": "own-copy", "jwk": {"kty": "OKP", "crv": "Ed25519", "x": x}}
        api.ok("POST", "/v1/trusted-keys", copy, status=201)
        req = {"tenant": demo, "body": b64(b"{}"), **signed}
        api.ok("POST", "/v1/telemetry/verify", req)
        reply = api("POST", "/v1/telemetry/verify", {**req, "tenant": acme, "kid": "own-copy"})
        assert (reply.status, reply.code) == (409, "replayed_nonce"), reply.body

        env = p.telemetry(demo, b'{"n":3}')
        labels = [{}, {"tenant": acme}, {"kid": second.kid}] * 16
        results = asyncio.run(
            post_each(api.sock, "/v1/telemetry/verify", [{**env, **label} for label in labels])
        )
        assert Counter(results) == {(200, None): 1, (409, "replayed_nonce"): 47}, results

        fb = p.feedback(demo, "s", {"a": 1})  # feedback signs tenant and kid: no relabelling
        api.ok("POST", "/v1/feedback/verify", {"envelope": fb, "schema": "s"})
        for label in ({"tenant": acme}, {"kid": second.kid}):
            reply = api("POST", "/v1/feedback/verify", {"envelope": {**fb, **label}, "schema": "s"})
            assert (reply.status, reply.code) == (401, "invalid_signature"), reply.body
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.timeout(180)
def test_redis_bounds_hold_for_the_daemon_as_a_whole(tmp_path: Path, redis: RedisServer) -> None:
    """With Redis and two workers: at most max_entries live nonces in all (not per worker) and
    max_entries_per_tenant for each tenant; past either, 503; accepted nonces stay replays."""
    prefix = f"signerd:{unique('pa')}:"
    nonces = {
        "store": "redis",
        "url": redis.url,
        "prefix": prefix,
        "max_entries": 40,
        "max_entries_per_tenant": 15,
    }
    d = federation_daemon(tmp_path / "d", {"nonces": nonces}, server={"workers": 2})
    try:
        _fill_to_the_bounds(d, "rb")
        assert redis.cli("ZCARD", f"{prefix}all") == "40"
        _served_by_both(d, "verify")  # both workers counted
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.timeout(120)
def test_redis_tenant_share_across_workers(tmp_path: Path, redis: RedisServer) -> None:
    """With Redis, a tenant at max_entries_per_tenant is refused (503) across workers while
    another tenant is still accepted; an accepted nonce stays a replay (409)."""
    nonces = {
        "store": "redis",
        "url": redis.url,
        "prefix": f"signerd:{unique('px')}:",
        "max_entries_per_tenant": 10,
    }
    d = federation_daemon(tmp_path / "d", {"nonces": nonces}, server={"workers": 2})
    try:
        api = Api(d)
        noisy, quiet = unique("rn"), unique("rq")
        p, q = Producer.new("p-noisy"), Producer.new("p-quiet")
        api.trust(noisy, p)
        api.trust(quiet, q)
        accepted = p.telemetry(noisy, b"{}")
        api.ok("POST", "/v1/telemetry/verify", accepted)
        full = (503, "nonce_store_unavailable")
        assert _verify_each(api, [p.telemetry(noisy, b"{}") for _ in range(40)]) == {
            (200, None): 9,
            full: 31,
        }
        assert _verify_each(api, [q.telemetry(quiet, b"{}") for _ in range(10)]) == {
            (200, None): 10
        }
        reply = api("POST", "/v1/telemetry/verify", accepted)
        assert (reply.status, reply.code) == (409, "replayed_nonce")
        _served_by_both(d, "verify")
    finally:
        assert d.stop() == 0, d.log_text()


@pytest.mark.timeout(60)
def test_redis_unreachable_or_silent_is_503(tmp_path: Path) -> None:
    """A Redis that refuses connections or never answers gives 503 nonce_store_unavailable, never 200."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # accepts into the backlog, never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for port in (closed_port, silent.getsockname()[1]):
            url = f"redis://127.0.0.1:{port}/0"
            d = federation_daemon(
                tmp_path / f"d{port}", {"nonces": {"store": "redis", "url": url, "timeout": 0.3}}
            )
            try:
                api = Api(d)
                tenant = unique("ru")
                p = Producer.new("p-redis-down")
                api.trust(tenant, p)
                started = time.monotonic()
                reply = api("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
                assert (reply.status, reply.code) == (503, "nonce_store_unavailable")
                assert time.monotonic() - started < 5
            finally:
                d.stop()
    finally:
        silent.close()


async def _stream(store: SqliteNonceStore | RedisNonceStore, n: int, ttl: float) -> Counter[str]:
    outcomes: Counter[str] = Counter()

    async def one(i: int) -> None:
        try:
            await store.add("t|k", f"n{i}-{os.urandom(6).hex()}", ttl)
            outcomes["ok"] += 1
        except NonceStoreUnavailable:
            outcomes["full"] += 1

    for start in range(0, n, 500):
        await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500))))
        await asyncio.sleep(0.01)
    return outcomes


@pytest.mark.timeout(180)
def test_sqlite_bounded_under_unique_nonces(tmp_path: Path) -> None:
    """A stream of 40,000 unique nonces with a short TTL keeps rows <= max and the files small."""
    path = tmp_path / "nonces.sqlite3"

    async def run() -> tuple[Counter[str], int, int]:
        store = SqliteNonceStore(str(path), max_entries=5000, timeout=10)
        try:
            outcomes = await _stream(store, 40_000, ttl=0.3)
            rows = store.entries()
            commits = store.commits
        finally:
            await store.close()
        return outcomes, rows, commits

    outcomes, rows, commits = asyncio.run(run())
    size = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert rows <= 5000
    assert size < 8 * 1024 * 1024, size
    assert outcomes["ok"] > 30_000  # expired entries make room again
    assert commits < 40_000 / 5  # group commit: many nonces per commit


@pytest.mark.timeout(60)
def test_sqlite_group_commit_and_replay_in_one_batch() -> None:
    """Concurrent adds share commits; the same nonce twice in one batch is one ok and one replay."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:

        async def run() -> tuple[list[BaseException | None], int]:
            store = SqliteNonceStore(f"{tmp}/n.sqlite3", max_entries=1000)
            try:
                results = await asyncio.gather(
                    *(store.add("s", "same", 60) for _ in range(200)), return_exceptions=True
                )
                return results, store.commits
            finally:
                await store.close()

        results, commits = asyncio.run(run())
        assert sum(r is None for r in results) == 1
        assert sum(isinstance(r, ReplayedNonce) for r in results) == 199
        assert commits < 200


@pytest.mark.timeout(120)
def test_redis_bounded_memory_refuses_when_full(tmp_path: Path) -> None:
    """Under maxmemory with noeviction, Redis refuses new nonces (503) and never evicts live ones."""
    with redis_server(tmp_path, "--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as r:

        async def run() -> Counter[str]:
            store = RedisNonceStore(r.url, timeout=2.0)
            try:
                await store.add("t|k", "first", 600)
                outcomes = await _stream(store, 30_000, ttl=600)
                try:
                    await store.add("t|k", "first", 600)
                    outcomes["first-accepted-again"] += 1
                except ReplayedNonce:
                    outcomes["first-replayed"] += 1
                except NonceStoreUnavailable:
                    outcomes["first-503"] += 1
                return outcomes
            finally:
                await store.close()

        outcomes = asyncio.run(run())
        used = int(
            next(
                line.split(":")[1]
                for line in r.cli("INFO", "memory").splitlines()
                if line.startswith("used_memory:")
            )
        )
        assert outcomes["full"] > 0 and outcomes["first-accepted-again"] == 0, outcomes
        assert used < 3 * 1024 * 1024, used
        assert int(r.cli("INFO", "stats").split("evicted_keys:")[1].split()[0]) == 0


@pytest.mark.timeout(60)
def test_redis_ttl_expires_nonces(redis: RedisServer) -> None:
    """A Redis nonce is a replay within its TTL and free again after it (PX expiry)."""

    async def run() -> None:
        store = RedisNonceStore(redis.url, timeout=2.0)
        try:
            nonce = os.urandom(8).hex()
            await store.add("t|k", nonce, 0.3)
            with pytest.raises(ReplayedNonce):
                await store.add("t|k", nonce, 0.3)
            await asyncio.sleep(0.5)
            await store.add("t|k", nonce, 0.3)
        finally:
            await store.close()

    asyncio.run(run())


def test_sqlite_store_on_unwritable_path_is_503(tmp_path: Path) -> None:
    """A nonce store that cannot open its file refuses (503), it never accepts."""
    blocker = tmp_path / "file"
    blocker.write_text("x")

    async def run() -> None:
        store = SqliteNonceStore(str(blocker / "n.sqlite3"), max_entries=10, timeout=5)
        try:
            for _ in range(2):  # the writer survives the failure and refuses again
                started = time.monotonic()
                with pytest.raises(NonceStoreUnavailable):
                    await store.add("s", "n", 60)
                assert time.monotonic() - started < 2
        finally:
            await store.close()

    asyncio.run(run())
