"""What workers share: the admin lock across processes, rate-limit buckets in shared memory,
and the ``server.workers`` setting."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signerd._config import ConfigError, default_workers, parse
from signerd.server._idemstore import MAX_BODY, Entry, IdempotencyStore
from signerd.workers import AdminLock, LockTimeout, SharedBuckets, runtime_path

pytestmark = pytest.mark.timeout(60)


def _fork(body: Callable[[], None]) -> int:
    """Run ``body`` in a forked child that exits 0 (1 if it raised); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    return pid


def _join(pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} did not finish in {timeout} s")


def _held_by_child(lock: AdminLock, seconds: float) -> int:
    """A child process holding ``lock`` for ``seconds``; returns once it holds it."""
    rfd, wfd = os.pipe()

    async def hold() -> None:
        async with lock.hold(timeout=5):
            os.write(wfd, b"x")
            await asyncio.sleep(seconds)

    pid = _fork(lambda: asyncio.run(hold()))
    os.close(wfd)
    assert os.read(rfd, 1) == b"x"
    os.close(rfd)
    return pid


# --- admin lock ---


def test_admin_lock_serialises_two_processes(tmp_path: Path) -> None:
    """Two processes taking the lock at once never overlap inside it."""
    lock, trace = AdminLock(str(tmp_path / "admin.lock")), tmp_path / "trace"
    go_r, go_w = os.pipe()

    async def work() -> None:
        for _ in range(6):
            async with lock.hold(timeout=10):
                with trace.open("a") as fh:
                    fh.write(f"in {os.getpid()}\n")
                await asyncio.sleep(0.01)
                with trace.open("a") as fh:
                    fh.write(f"out {os.getpid()}\n")

    def child() -> None:
        os.read(go_r, 1)
        asyncio.run(work())

    pids = [_fork(child), _fork(child)]
    os.write(go_w, b"xx")
    assert [_join(p) for p in pids] == [0, 0]
    lines = trace.read_text().split()
    pairs = list(zip(lines[0::2], lines[1::2], strict=True))
    assert len(pairs) == 24  # 12 entries: (in, pid, out, pid)
    for n in range(0, len(pairs), 2):
        (a, pid_a), (b, pid_b) = pairs[n], pairs[n + 1]
        assert (a, b) == ("in", "out") and pid_a == pid_b, lines
    assert {p for _, p in pairs} == {str(p) for p in pids}


async def test_admin_lock_serialises_coroutines_of_one_process(tmp_path: Path) -> None:
    """Two tasks of one event loop take turns (flock alone would let both in)."""
    lock, inside, most = AdminLock(str(tmp_path / "admin.lock")), [0], [0]

    async def work() -> None:
        for _ in range(5):
            async with lock.hold(timeout=5):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                await asyncio.sleep(0.005)
                inside[0] -= 1

    await asyncio.gather(work(), work(), work())
    assert most[0] == 1


async def test_admin_lock_waits_without_blocking_the_loop_and_times_out(tmp_path: Path) -> None:
    """While another process holds it, taking it times out (LockTimeout) and the loop keeps running."""
    lock = AdminLock(str(tmp_path / "admin.lock"))
    holder = _held_by_child(AdminLock(lock.path), 2.0)
    ticks = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks[0] += 1

    ticker = asyncio.create_task(tick())
    started = time.monotonic()
    with pytest.raises(LockTimeout):
        async with lock.hold(timeout=0.3):
            pass
    took = time.monotonic() - started
    ticker.cancel()
    assert 0.3 <= took < 1.0
    assert ticks[0] >= 10
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)


async def test_admin_lock_is_freed_when_its_holder_dies(tmp_path: Path) -> None:
    """A worker killed while holding the lock does not keep it."""
    lock = AdminLock(str(tmp_path / "admin.lock"))
    holder = _held_by_child(AdminLock(lock.path), 3600)
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    async with lock.hold(timeout=1):
        pass


def test_admin_lock_used_before_a_fork_still_excludes_the_child(tmp_path: Path) -> None:
    """A lock object opened before fork reopens its file in the child (an inherited one would be shared)."""
    lock = AdminLock(str(tmp_path / "admin.lock"))

    async def once() -> None:
        async with lock.hold(timeout=1):
            pass

    asyncio.run(once())  # opens the file in this process
    holder = _held_by_child(lock, 2.0)  # the same object, in the child

    async def blocked() -> None:
        with pytest.raises(LockTimeout):
            async with lock.hold(timeout=0.2):
                pass

    asyncio.run(blocked())
    os.kill(holder, signal.SIGKILL)
    os.waitpid(holder, 0)
    asyncio.run(once())
    lock.close()


def _contend(
    path: str,
    slots: int,
    seconds: float,
    out: Path,
    callers: int = 3,
    pause: float = 0.0,
    procs: int = 2,
) -> list[int]:
    """``procs`` processes, ``callers`` each, taking the lock over and over for ``seconds``
    (holding it 5 ms, asking again ``pause`` after each turn); the pids. Each writes
    "turns longest-wait-ms" to out/<index>."""
    go_r, go_w = os.pipe()

    def child(index: int) -> None:
        lock = AdminLock(path, slot=index, slots=slots)
        turns, longest = [0], [0.0]

        async def caller() -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                asked = time.monotonic()
                async with lock.hold(timeout=10):
                    longest[0] = max(longest[0], time.monotonic() - asked)
                    turns[0] += 1
                    await asyncio.sleep(0.005)
                await asyncio.sleep(pause)

        async def all_callers() -> None:
            await asyncio.gather(*(caller() for _ in range(callers)))

        os.read(go_r, 1)
        asyncio.run(all_callers())
        (out / str(index)).write_text(f"{turns[0]} {longest[0] * 1000:.0f}")

    pids = [_fork(lambda i=i: child(i)) for i in range(procs)]  # type: ignore[misc]
    os.write(go_w, b"x" * procs)
    assert [_join(p, 30) for p in pids] == [0] * procs
    return pids


@pytest.mark.parametrize(
    ("procs", "callers", "pause"),
    [(2, 3, 0.0), (3, 1, 0.001)],
    ids=["callers-queued", "callers-asking-again-at-once"],
)
def test_admin_lock_takes_turns_between_workers(
    tmp_path: Path, procs: int, callers: int, pause: float
) -> None:
    """Workers whose callers keep asking for the lock each get turns, in turn: the one that
    releases lets a waiting worker in before its own next caller, whether that caller was
    queued already or asks again a moment after its turn (a client's next request)."""
    _contend(str(tmp_path / "admin.lock"), procs, 2.0, tmp_path, callers, pause, procs)
    results = [tuple(map(int, (tmp_path / str(i)).read_text().split())) for i in range(procs)]
    turns = [t for t, _ in results]
    assert min(turns) >= 0.6 * max(turns), results  # about one turn each, in turn
    assert sum(turns) >= 100, results  # 2 s at 5 ms a turn, whatever the polls cost
    # nobody waits for more than a few turns of the others
    assert max(ms for _, ms in results) < 250, results


def test_admin_lock_gives_way_only_to_a_worker_still_waiting(tmp_path: Path) -> None:
    """A slot left showing waiters (a worker killed while waiting) delays the others'
    turns by the bounded give-way at most, and a new worker in that slot clears it."""
    path = str(tmp_path / "admin.lock")
    ghost = AdminLock(path, slot=1, slots=2)
    ghost._publish(waiting=+5)  # as a worker killed while five callers waited
    lock = AdminLock(path, slot=0, slots=2)

    async def twice() -> float:
        started = time.monotonic()
        await asyncio.gather(*(once() for _ in range(4)))
        return time.monotonic() - started

    async def once() -> None:
        async with lock.hold(timeout=5):
            await asyncio.sleep(0.001)

    took = asyncio.run(twice())
    assert took < 4 * 0.25 + 0.5, took  # each turn gives way for 0.25 s at most
    AdminLock(path, slot=1, slots=2)  # the replacement worker clears its slot
    assert asyncio.run(twice()) < 0.2


def test_runtime_path_prefers_systemds_runtime_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lock lives in $RUNTIME_DIRECTORY (first entry) when systemd sets it, else beside the socket."""
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    assert (
        runtime_path("/run/signerd/signerd.sock", "admin.lock")
        == "/run/signerd/.signerd-admin.lock"
    )
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/sd-a:/run/sd-b")
    assert runtime_path("/srv/s.sock", "admin.lock") == "/run/sd-a/.signerd-admin.lock"


# --- shared rate-limit buckets ---

KEY = ("gateway", 1000, "gateway.service")


def test_buckets_refill_at_the_rate_up_to_the_burst() -> None:
    """A bucket starts full, refills rate/s, never above burst (a lowered burst caps it at once)."""
    b = SharedBuckets(64)
    assert [b.take(KEY, 1.0, 2, 100.0) for _ in range(3)] == [True, True, False]
    assert not b.take(KEY, 1.0, 2, 100.5)  # half a token
    assert b.take(KEY, 1.0, 2, 101.0)
    assert b.take(KEY, 1.0, 2, 200.0) and b.tokens(KEY) == 1.0
    assert b.take(KEY, 1.0, 1, 300.0) and b.tokens(KEY) == 0.0
    assert b.tokens(("other", 1, None)) is None
    b.close()


def test_buckets_keep_keys_apart_and_evict_the_idlest_when_a_group_is_full() -> None:
    """Distinct keys have distinct buckets; a full group gives a new key the slot idle longest."""
    b = SharedBuckets(8)  # one group of 8 slots
    keys = [("r", uid, None) for uid in range(9)]
    for t, key in enumerate(keys[:8]):
        assert b.take(key, 1.0, 1, float(t))
        assert not b.take(key, 1.0, 1, float(t))
    assert b.take(keys[8], 1.0, 1, 100.0)
    assert b.tokens(keys[0]) is None
    assert all(b.tokens(k) is not None for k in keys[1:])
    b.close()


def test_one_rate_holds_across_two_processes() -> None:
    """Two processes hammering one caller's bucket get burst + rate x time together, not twice that."""
    b = SharedBuckets()
    rate, burst, seconds = 50.0, 5, 1.0
    rfd, wfd = os.pipe()
    go_r, go_w = os.pipe()

    def hammer() -> None:
        os.read(go_r, 1)
        allowed, end = 0, time.monotonic() + seconds
        while (now := time.monotonic()) < end:
            allowed += b.take(KEY, rate, burst, now)
        os.write(wfd, f"{allowed}\n".encode())

    pids = [_fork(hammer), _fork(hammer)]
    started = time.monotonic()
    os.write(go_w, b"xx")
    assert [_join(p) for p in pids] == [0, 0]
    elapsed = time.monotonic() - started
    counts = [int(x) for x in os.read(rfd, 100).split()]
    assert len(counts) == 2 and all(c > 0 for c in counts), counts
    assert sum(counts) <= burst + rate * elapsed + 1, (counts, elapsed)
    assert sum(counts) >= burst + rate * seconds * 0.8, counts
    b.close()


def test_a_worker_dying_inside_a_take_does_not_wedge_the_others() -> None:
    """A process killed while holding a group's mutex: the next take recovers (robust mutex)."""
    b = SharedBuckets(8)

    def die_holding() -> None:
        b._acquire(0)
        os.kill(os.getpid(), signal.SIGKILL)

    pid = _fork(die_holding)
    assert _join(pid) == -signal.SIGKILL
    result: list[bool] = []
    taker = threading.Thread(target=lambda: result.append(b.take(KEY, 1.0, 1, 1.0)), daemon=True)
    taker.start()
    taker.join(timeout=5)
    assert result == [True]
    assert b.take(("r", 2, None), 1.0, 1, 1.0)


def test_a_take_costs_a_few_microseconds() -> None:
    """take() with its cross-process mutex stays in the microseconds (measured here: about 4 µs)."""
    b = SharedBuckets()
    n = 20000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(n):
            b.take(KEY, 1e9, 1e9, time.monotonic())
        best = min(best, (time.perf_counter() - started) / n)
    assert best < 25e-6, f"{best * 1e6:.1f} µs per take"
    b.close()


# --- server.workers ---


def _doc(**server: Any) -> dict[str, Any]:
    return {
        "server": {"socket": "/tmp/x.sock", **server},
        "backends": {"hsm": {"type": "pkcs11"}},
        "audit": {"path": "/tmp/a.jsonl"},
    }


def test_workers_default_to_the_cpus_and_at_least_two() -> None:
    """server.workers unset: the CPUs signerd may run on, never fewer than 2; set: that number."""
    assert parse(_doc()).workers == default_workers() == max(2, len(os.sched_getaffinity(0)))
    assert parse(_doc(workers=1)).workers == 1
    assert parse(_doc(workers=5)).workers == 5


@pytest.mark.parametrize("value", [0, -1, 65, "2", True, 2.0])
def test_bad_workers_values_name_the_key(value: object) -> None:
    """A worker count that is not an integer from 1 to 64 is a ConfigError naming server.workers."""
    with pytest.raises(ConfigError, match=r"server\.workers"):
        parse(_doc(workers=value))


# --- the Idempotency-Key store ------------------------------------------------------------


def _entry(scope: str, created: float, target: str = "key t/k") -> Entry:
    return Entry(scope, created, target, "rotate", "f" * 64, f"rid-{scope}", {"last": 1})


async def test_idempotency_store_keeps_a_bounded_number_for_a_bounded_time(
    tmp_path: Path,
) -> None:
    """Kept at most max_entries (the oldest go first) and at most ttl seconds; an intent is
    listed for its target until it has its answer; answers over MAX_BODY keep no body."""
    store = IdempotencyStore(str(tmp_path / "idem.db"), ttl=60.0, max_entries=5)
    now = time.time()
    for i in range(8):
        await store.begin(_entry(f"s{i}", now + i))
    assert store.count() == 5
    assert await store.get("s2") is None and await store.get("s3") is not None
    assert [e.scope for e in await store.intents("key t/k")] == [f"s{i}" for i in range(3, 8)]
    await store.finish(_entry("s3", now + 3), 200, b"{}", "t.k.v2")
    await store.finish(_entry("s4", now + 4), 200, b"x" * (MAX_BODY + 1), "t.k.v3")
    assert [e.scope for e in await store.intents("key t/k")] == ["s5", "s6", "s7"]
    done, big = await store.get("s3"), await store.get("s4")
    assert done is not None and (done.status, done.body, done.kid) == (200, b"{}", "t.k.v2")
    assert big is not None and big.status == 200 and big.body is None
    await store.begin(_entry("old", now - 61))  # older than the ttl: gone at once
    assert await store.get("old") is None and store.count() <= 5
    assert oct((tmp_path / "idem.db").stat().st_mode & 0o777) == "0o600"


async def test_idempotency_store_is_shared_by_processes(tmp_path: Path) -> None:
    """What one process stores, another process reads (the workers share the file)."""
    path = str(tmp_path / "idem.db")

    def child() -> None:
        asyncio.run(IdempotencyStore(path).begin(_entry("from-child", time.time())))

    assert _join(_fork(child)) == 0
    found = await IdempotencyStore(path).get("from-child")
    assert found is not None and found.before == {"last": 1} and found.status is None


def test_the_store_keeps_hashes_not_the_keys_callers_send(tmp_path: Path) -> None:
    """A daemon's store holds the SHA-256 of (uid, key), never the Idempotency-Key itself."""
    from ..conftest import start_daemon, unique
    from ..support.rawhttp import request

    d = start_daemon(tmp_path / "d", server={"workers": 2})
    try:
        key, idem = f"{unique('hash')}/k", f"secret-looking-{unique('key')}"
        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        headers = {"Idempotency-Key": idem}
        reply = request(str(d.socket_path), "POST", f"/v1/keys/{key}/rotate", {}, headers=headers)
        assert reply.status == 200
        db = d.socket_path.parent / ".signerd-idempotency.db"
        stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
        assert idem.encode() not in stored and idem.encode() not in d.log_path.read_bytes()
        scope = hashlib.sha256(f"{os.getuid()}:{idem}".encode()).hexdigest()
        found = asyncio.run(IdempotencyStore(str(db)).get(scope))
        assert found is not None and found.kind == "rotate" and found.status == 200
    finally:
        d.stop()
