"""A backend's slots are shared tenant by tenant (``FairSlots``), and no slot leaks."""

from __future__ import annotations

import asyncio
import threading

import pytest

from signerd.keys._fair import FairSlots

pytestmark = pytest.mark.timeout(30)


async def _call(slots: FairSlots, tenant: str, done: list[str], hold: asyncio.Event) -> None:
    async with slots.slot(tenant):
        await hold.wait()
        done.append(tenant)


async def test_a_flooding_tenant_delays_another_by_one_call_not_its_queue() -> None:
    """With one slot and 50 calls of one tenant waiting, another tenant's call is served
    third (after the call in progress and the one whose turn came first), and every
    call is served."""
    slots, done, hold = FairSlots(1), list[str](), asyncio.Event()
    flood = [asyncio.create_task(_call(slots, "flood", done, hold)) for _ in range(50)]
    await asyncio.sleep(0)
    other = asyncio.create_task(_call(slots, "other", done, hold))
    await asyncio.sleep(0)
    assert slots.waiting == 50
    hold.set()
    await asyncio.gather(*flood, other)
    assert done.index("other") == 2
    assert len(done) == 51 and slots.waiting == 0


async def test_turns_alternate_between_waiting_tenants() -> None:
    """Three tenants with several calls waiting each are served round-robin."""
    slots, done, hold = FairSlots(1), list[str](), asyncio.Event()
    blocker = asyncio.create_task(_call(slots, "z", done, hold))
    await asyncio.sleep(0)
    tasks = [
        asyncio.create_task(_call(slots, t, done, hold)) for t in ("a", "a", "a", "b", "b", "c")
    ]
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(blocker, *tasks)
    assert done == ["z", "a", "b", "c", "a", "b", "a"]


async def test_a_waiter_that_times_out_leaks_no_slot() -> None:
    """A caller cancelled while waiting (its timeout) leaves the slot count as it was; so
    does one cancelled at the moment it was handed the slot."""
    slots, done, hold = FairSlots(2), list[str](), asyncio.Event()
    held = [asyncio.create_task(_call(slots, "a", done, hold)) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            async with slots.slot("b"):
                pass
    assert slots.waiting == 0
    late = asyncio.create_task(_call(slots, "c", done, hold))
    await asyncio.sleep(0)
    hold.set()
    await asyncio.sleep(0)  # the held calls end and hand a slot to "c" ...
    late.cancel()  # ... which is cancelled before it runs
    await asyncio.gather(*held, late, return_exceptions=True)
    hold.clear()
    # both slots are free again: two calls hold them at once, a third waits
    again = [asyncio.create_task(_call(slots, "d", done, hold)) for _ in range(3)]
    await asyncio.sleep(0)
    assert slots.waiting == 1
    hold.set()
    await asyncio.gather(*again)
    assert slots.waiting == 0 and done.count("d") == 3


class _OneThread:
    """A stand-in backend with one thread of concurrency (only ``Executors`` reads it)."""

    max_concurrency = 1

    def close(self) -> None:
        pass


async def test_executors_share_a_backend_between_its_tenants_by_turns() -> None:
    """Calls for keys of two tenants on one backend: the second tenant's call does not wait
    behind the first tenant's queue of 20."""
    from typing import cast

    from signerd.backends import Backend
    from signerd.keys._executors import Executors
    from signerd.wire import KeyName

    calls = Executors(
        {"one": cast(Backend, _OneThread())},
        default_backend="one",
        tenant_backends=None,
        timeout=10,
    )
    gate, done = threading.Event(), list[str]()

    def work(tenant: str) -> None:
        gate.wait(10)
        done.append(tenant)

    try:
        flood = [
            asyncio.create_task(calls.on(KeyName("flood", f"k{i}"), lambda _: work("flood")))
            for i in range(20)
        ]
        await asyncio.sleep(0.05)
        other = asyncio.create_task(calls.on(KeyName("other", "k"), lambda _: work("other")))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(*flood, other)
    finally:
        await calls.close()
    assert done.index("other") <= 2 and len(done) == 21
