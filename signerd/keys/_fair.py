"""Calls into one backend, shared fairly between its tenants.

A backend takes ``max_concurrency`` calls at once. Callers beyond that wait for
a slot, and the slots that free up are handed out tenant by tenant in turn: a
tenant with a hundred calls waiting delays another tenant's single call by at
most one call per tenant ahead of it, never by its whole queue.

Waiting is bounded: past ``max_waiting`` callers waiting (all tenants), a new
one is refused at once with 503 ``backend_unavailable``, rather than queued
behind calls that a hung backend will not finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

from ..errors import BackendUnavailable

__all__ = ["FairSlots"]


class FairSlots:
    def __init__(self, size: int, max_waiting: int = 1024) -> None:
        if size < 1 or max_waiting < 0:
            raise ValueError("size must be at least 1, max_waiting at least 0")
        self._free = size
        self._max_waiting = max_waiting
        self._count = 0  # callers waiting, all tenants
        #: tenants with callers waiting, in the order of their turns
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot (all tenants)."""
        return self._count

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one slot for the block (waiting for ``tenant``'s turn when none is free)."""
        await self.acquire(tenant)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, tenant: str) -> None:
        """Take one slot, waiting for ``tenant``'s turn when none is free; BackendUnavailable
        at once when ``max_waiting`` callers are waiting already. ``release`` gives it back."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        if self._count >= self._max_waiting:
            raise BackendUnavailable("too many calls are waiting for the key backend")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(tenant, deque()).append(future)
        self._count += 1
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot as it was cancelled: pass it on
            else:
                self._forget(tenant, future)
            raise

    def release(self) -> None:
        """Hand the slot to the first waiting caller of the tenant whose turn it is."""
        while self._waiting:
            tenant, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
            self._count -= 1
            if queue:
                self._waiting.move_to_end(tenant)  # its next caller waits for the next round
            else:
                del self._waiting[tenant]
            if not future.done():  # a cancelled waiter is skipped
                future.set_result(None)
                return
        self._free += 1

    def _forget(self, tenant: str, future: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is not None:
            try:
                queue.remove(future)
                self._count -= 1
            except ValueError:
                pass
            if not queue:
                del self._waiting[tenant]
