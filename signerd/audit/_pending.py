"""A record on its way to the disk: the queue's unit of work, and a record written ahead.

``Job`` is one record in the trail's queue. ``Ahead`` is a record queued for
the writer thread *before* the operation it announces (an ``intent`` record:
a sign about to be made): the disk writes and fsyncs it while the caller goes
on working (the token signs meanwhile), and the caller awaits ``durable()``
before the operation's result leaves.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._events import AuditEvent

__all__ = ["Ahead", "Job", "expire", "resolve", "resolve_all"]


@dataclass(eq=False)
class Job:
    event: AuditEvent
    loop: asyncio.AbstractEventLoop | None  # None for a record nobody waits for (``submit``)
    future: asyncio.Future[None] | None
    state: str = "queued"  # queued -> writing -> done; or queued -> abandoned
    abandoned: bool = False  # the caller gave up while the record was being written
    failed: bool = False
    seq: int = 0


def resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def resolve_all(futures: list[asyncio.Future[None]]) -> None:
    """Every future of a batch written, in one call on their loop."""
    for future in futures:
        if not future.done():
            future.set_result(None)


def expire(future: asyncio.Future[None]) -> None:
    """The waiter's deadline passed: its ``await`` raises TimeoutError (unless written)."""
    if not future.done():
        future.set_exception(TimeoutError())


class Ahead:
    """A record written ahead of its operation: ``durable()`` returns once it is on disk,
    or raises AuditUnavailable by ``write_timeout`` after it was queued."""

    __slots__ = ("_deadline", "_wait", "job")

    def __init__(
        self, job: Job, wait: Callable[[Job, float], Awaitable[None]], timeout: float
    ) -> None:
        self.job = job
        self._wait = wait
        self._deadline = time.monotonic() + timeout

    async def durable(self) -> None:
        job = self.job
        if job.state == "done" and not job.failed:
            return
        await self._wait(job, max(0.001, self._deadline - time.monotonic()))
