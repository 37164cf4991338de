"""Coalescing concurrent sign requests into batch calls.

Requests for the same (backend, key, version) that arrive while a batch for
it is in flight wait for the next batch, which takes everything queued (up to
``max_batch``). A lone caller is never held back: when nothing is in flight,
its request goes out at once; when the server is answering others too, after
the rest of the requests that loop turn read (they join it: one group, one
backend call). Under load, batches form by themselves, which is
what makes Vault's ``batch_input`` pay and saves executor hops on a token.
Each caller gets its own result or its own error.

Waiting is bounded in time and number: a caller whose signature has not come
back ``max_wait`` seconds after it asked is answered 503
``backend_unavailable`` (its item, if still queued, is dropped; if already in a
batch, its signature is discarded), and past ``max_waiting`` callers queued for
one version a new one is refused at once with the same code. A hung backend
therefore holds no caller past its deadline and no queue past its size.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import BackendUnavailable, InternalError, SignerdError

G = TypeVar("G", bound=Hashable)

BatchRunner = Callable[[G, Sequence[bytes]], Awaitable[Sequence[bytes | SignerdError]]]
#: each batch run: (group, items, seconds its oldest item waited, seconds the run took)
BatchObserver = Callable[[G, int, float, float], None]


@dataclass
class _Queue:
    waiting: deque[tuple[bytes, asyncio.Future[bytes], float]] = field(default_factory=deque)
    in_flight: int = 0
    gathering: bool = False  # a leader waits for the rest of its loop turn


class Coalescer(Generic[G]):
    def __init__(
        self,
        run: BatchRunner[G],
        *,
        max_batch: int,
        max_in_flight: int,
        max_wait: float | None = None,
        max_waiting: int | None = None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._max_wait = max_wait
        #: callers queued per group at most (by default, eight full rounds of batches)
        self._max_waiting = max_waiting or 8 * max_batch * max_in_flight
        self._queues: dict[G, _Queue] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # counters, for metrics and tests
        self.items = 0
        self.observe: BatchObserver[G] | None = None  # the metrics' hook

    async def submit(self, group: G, item: bytes, gather: bool = True) -> bytes:
        """``item``'s signature. ``gather``: other requests may be arriving in this loop turn
        (the server answers several), so a leader lets them join its batch first."""
        loop = asyncio.get_running_loop()
        deadline = None if self._max_wait is None else loop.time() + self._max_wait
        future: asyncio.Future[bytes] = loop.create_future()
        queue = self._queues.get(group)
        if queue is None:
            queue = self._queues[group] = _Queue()
        if len(queue.waiting) >= self._max_waiting:
            raise BackendUnavailable("too many signatures are waiting for the key backend")
        queue.waiting.append((item, future, time.perf_counter()))
        if queue.in_flight < self._max_in_flight and not queue.gathering:
            # This caller leads a batch itself (no task); whatever queues up meanwhile is
            # drained by a task afterwards. With ``gather`` it lets the rest of this loop
            # turn run first, so the requests that arrived together go out in one call.
            queue.in_flight += 1
            try:
                if gather:
                    queue.gathering = True
                    try:
                        await asyncio.sleep(0)
                    finally:
                        queue.gathering = False
                await self._run_batch(group, queue)
            finally:
                if queue.waiting:
                    task = asyncio.get_running_loop().create_task(self._drain(group, queue))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    self._release(group, queue)
        if future.done() or deadline is None:
            return await future
        # at the deadline the future fails: its item is dropped from its queue, or its
        # signature discarded (a timer, not asyncio.timeout: this is every waiter's path)
        timer = loop.call_at(deadline, _late, future)
        try:
            return await future
        finally:
            timer.cancel()

    async def _drain(self, group: G, queue: _Queue) -> None:
        try:
            while queue.waiting:
                await self._run_batch(group, queue)
        finally:
            self._release(group, queue)

    def _release(self, group: G, queue: _Queue) -> None:
        queue.in_flight -= 1
        if queue.in_flight == 0 and not queue.waiting:
            self._queues.pop(group, None)

    async def _run_batch(self, group: G, queue: _Queue) -> None:
        waiting = queue.waiting
        batch = [waiting.popleft() for _ in range(min(self._max_batch, len(waiting)))]
        batch = [job for job in batch if not job[1].done()]  # given up on: not signed
        if not batch:
            return
        self.batches += 1
        self.items += len(batch)
        observe, started = self.observe, time.perf_counter()
        try:
            results = await self._run(group, [item for item, _, _ in batch])
            took = time.perf_counter() - started
            if len(results) != len(batch):
                raise InternalError("backend answered a batch with the wrong number of results")
        except Exception as exc:  # every waiter of this batch gets its error
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        except BaseException:
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(InternalError("signing was interrupted"))
            raise
        for (_, fut, _), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, SignerdError):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        if observe is not None:  # once every caller has its answer (it must not raise)
            observe(group, len(batch), started - batch[0][2], took)

    async def aclose(self) -> None:
        """Stop the tasks draining queues."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _late(future: asyncio.Future[bytes]) -> None:
    """A waiter's deadline passed before its signature came."""
    if not future.done():
        future.set_exception(BackendUnavailable("the key backend did not answer in time"))
