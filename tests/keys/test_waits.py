"""Every wait behind a backend that does not answer is bounded in time and in number."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from signerd.errors import BackendUnavailable, SignerdError
from signerd.keys._coalesce import Coalescer
from signerd.keys._executors import Executors
from signerd.keys._fair import FairSlots

pytestmark = pytest.mark.timeout(30)


async def test_coalesced_callers_behind_a_hung_batch_get_503_at_their_deadline() -> None:
    """With a batch that does not return (its runner bounds its own time), the callers
    queued behind it are answered backend_unavailable after max_wait, not after the
    batches ahead of them."""
    release = asyncio.Event()

    async def run(group: str, items: Sequence[bytes]) -> list[bytes | SignerdError]:
        await release.wait()
        return list(items)

    c: Coalescer[str] = Coalescer(run, max_batch=1, max_in_flight=1, max_wait=0.2)
    started = time.monotonic()
    leader = asyncio.create_task(c.submit("g", b"lead"))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(c.submit("g", b"%d" % i)) for i in range(20)]
    results = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 5)
    took = time.monotonic() - started
    assert all(isinstance(r, BackendUnavailable) for r in results), results
    assert 0.2 <= took < 1.5, took
    release.set()
    assert await asyncio.wait_for(leader, 5) == b"lead"
    await c.aclose()


async def test_coalescer_refuses_past_max_waiting_and_serves_the_rest() -> None:
    """Past max_waiting callers queued for one group a new one is refused at once (503);
    those queued are signed once the backend answers."""
    release = asyncio.Event()

    async def run(group: str, items: Sequence[bytes]) -> list[bytes | SignerdError]:
        await release.wait()
        return list(items)

    c: Coalescer[str] = Coalescer(run, max_batch=2, max_in_flight=1, max_waiting=4)
    leader = asyncio.create_task(c.submit("g", b"lead"))
    await asyncio.sleep(0)
    queued = [asyncio.create_task(c.submit("g", b"q%d" % i)) for i in range(4)]
    await asyncio.sleep(0)
    with pytest.raises(BackendUnavailable):
        await c.submit("g", b"one too many")
    release.set()
    assert await asyncio.wait_for(leader, 5) == b"lead"
    assert await asyncio.wait_for(asyncio.gather(*queued), 5) == [b"q0", b"q1", b"q2", b"q3"]
    await c.aclose()


async def test_fair_slots_refuse_past_max_waiting_and_count_right() -> None:
    """Past max_waiting callers waiting for a slot a new one is refused at once; waiters
    that time out or are served leave the count at zero."""
    slots = FairSlots(1, max_waiting=2)
    await slots.acquire("a")
    waiters = [asyncio.create_task(slots.acquire(t)) for t in ("a", "b")]
    await asyncio.sleep(0)
    assert slots.waiting == 2
    with pytest.raises(BackendUnavailable):
        await slots.acquire("c")
    waiters[0].cancel()
    await asyncio.sleep(0)
    assert slots.waiting == 1
    slots.release()
    await asyncio.wait_for(waiters[1], 5)
    assert slots.waiting == 0
    slots.release()
    await asyncio.wait_for(slots.acquire("d"), 1)  # the one slot is free again


class _Hung:
    """A backend whose calls block until released; one call at a time."""

    max_concurrency = 1

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def describe(self, _: object) -> str:
        self.calls += 1
        self.release.wait(10)
        return "answered"

    def close(self) -> None:
        pass


async def test_a_call_given_up_on_keeps_its_slot_until_its_thread_returns() -> None:
    """A hung call answered 503 at its timeout keeps the backend's slot: the next caller
    waits for a slot (503 at its own timeout) instead of queueing in the executor, and
    gets the slot once the hung call returns."""
    hung = _Hung()
    calls = Executors(
        {"b": hung},  # type: ignore[dict-item]
        default_backend="b",
        tenant_backends=None,
        timeout=0.2,
    )

    async def call() -> str:
        return await calls.run("b", lambda: hung.describe(None), tenant="t")

    with pytest.raises(BackendUnavailable):
        await call()
    started = time.monotonic()
    second = asyncio.create_task(call())
    await asyncio.sleep(0.05)
    assert calls._slots["b"].waiting == 1  # waiting for the slot, not in the executor
    with pytest.raises(BackendUnavailable):
        await second
    assert time.monotonic() - started < 1.5
    assert hung.calls == 1 and calls._slots["b"].waiting == 0
    hung.release.set()
    assert await call() == "answered" and hung.calls == 2
    await calls.close()


def test_the_default_bounds_are_the_documented_ones() -> None:
    """By default 1,024 signs wait per key version and 1,024 calls per backend, at most."""

    async def run(group: str, items: Sequence[bytes]) -> list[bytes | SignerdError]:
        return list(items)

    assert Coalescer(run, max_batch=64, max_in_flight=2)._max_waiting == 1024
    assert FairSlots(1)._max_waiting == 1024


async def test_signs_of_one_loop_turn_go_out_as_one_batch_and_a_lone_one_at_once() -> None:
    """With ``gather``, the signs submitted in one loop turn make one backend call; without,
    a lone sign's call is made before its submit yields to the loop."""
    calls: list[int] = []

    async def run(group: str, items: Sequence[bytes]) -> list[bytes | SignerdError]:
        calls.append(len(items))
        return [b"sig-" + i for i in items]

    coalescer: Coalescer[str] = Coalescer(run, max_batch=64, max_in_flight=2, max_wait=5.0)
    got = await asyncio.gather(*(coalescer.submit("g", b"%d" % i, True) for i in range(8)))
    assert got == [b"sig-%d" % i for i in range(8)] and calls == [8]

    calls.clear()
    lone = asyncio.ensure_future(coalescer.submit("g", b"x", False))
    await asyncio.sleep(0)  # one step of the task: its call is made in it
    assert calls == [1]
    assert await lone == b"sig-x"
