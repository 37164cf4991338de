"""Calls into one backend, shared fairly between its tenants.

A backend takes ``max_concurrency`` calls at once. Callers beyond that wait for
a slot, and the slots that free up are handed out tenant by tenant in turn: a
tenant with a hundred calls waiting delays another tenant's single call by at
most one call per tenant ahead of it, never by its whole queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque
from collections.abc import AsyncIterator

__all__ = ["FairSlots"]


class FairSlots:
    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        self._free = size
        #: tenants with callers waiting, in the order of their turns
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()

    @property
    def waiting(self) -> int:
        """Callers waiting for a slot (all tenants)."""
        return sum(len(q) for q in self._waiting.values())

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one slot for the block (waiting for ``tenant``'s turn when none is free)."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
        else:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(tenant, deque()).append(future)
            try:
                await future
            except BaseException:
                if future.done() and not future.cancelled():
                    self._release()  # handed a slot as it was cancelled: pass it on
                else:
                    self._forget(tenant, future)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        """Hand the slot to the first waiting caller of the tenant whose turn it is."""
        while self._waiting:
            tenant, queue = next(iter(self._waiting.items()))
            future = queue.popleft()
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
            with contextlib.suppress(ValueError):
                queue.remove(future)
            if not queue:
                del self._waiting[tenant]
