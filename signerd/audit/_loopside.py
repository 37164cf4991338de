"""The audit trail's side on the event loop: handing records to the writer thread, and
waiting for one to be written.

Records written ahead (``ahead``) with ``group`` go to the writer at the end of the
loop turn, together; records ``submit_later`` queued go with the next write, or by
one loop timer at their due time (never a timer a request); a caller waits for its
record with a timer that fails its future, not ``wait_for``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

from ..errors import AuditUnavailable
from ._pending import Job, expire

__all__ = ["EARLY", "LATER", "LoopSide"]

log = logging.getLogger("signerd.audit")

LATER = 0.05  # s: a record ``submit_later`` queued waits at most this for the next write
EARLY = 0.005  # s: how early a loop's timer may fire (uvloop's run in milliseconds)


class LoopSide:
    """Mixed into ``AuditTrail``, whose writer thread and queue these are."""

    _cond: threading.Condition
    _queue: deque[Job]
    _handed: bool  # queued records are the writer thread's to write now
    _hand_due: bool  # a hand-over of records written ahead is scheduled
    _later_due: float | None  # when records queued ``submit_later`` are due
    #: the timer that hands them over (its loop, when, handle): one at a time, not one a request
    _later_timer: tuple[asyncio.AbstractEventLoop, float, asyncio.TimerHandle] | None

    def _hand_ahead(self) -> None:
        """What ``ahead`` queued in the last loop turn: to the writer thread now."""
        with self._cond:
            self._hand_due = False
            self._handed = True
            self._cond.notify()

    async def _wait(self, job: Job, timeout: float) -> None:
        """Until ``job`` is written; AuditUnavailable when it failed or ``timeout`` passed."""
        event, future = job.event, job.future
        assert future is not None
        # a timer that fails the future, not wait_for(shield()): a third of the loop's work
        timer = asyncio.get_running_loop().call_later(timeout, expire, future)
        try:
            await future
        except (TimeoutError, asyncio.CancelledError) as exc:
            with self._cond:
                written = job.state == "done" and not job.failed
                if job.state == "queued":
                    self._queue.remove(job)
                    job.state = "abandoned"
                elif job.state == "writing":
                    job.abandoned = True
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not written:
                log.error(
                    "signerd.audit_unavailable reason=timeout request_id=%s", event.request_id
                )
                raise AuditUnavailable() from None
            return
        finally:
            timer.cancel()
        if job.failed:
            raise AuditUnavailable()

    def _remind_later(self) -> None:
        """What ``submit_later`` queued goes to the writer within ``LATER`` s (hold ``_cond``):
        on a loop, by a timer (waking the writer now to sleep again costs a thread switch)."""
        due = self._later_due = time.monotonic() + LATER
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._cond.notify()  # its next wake-up is due then, at the latest
            return
        self._later_at(loop, due)

    def _later_at(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        """A timer of ``loop`` hands the records over at ``due`` (hold ``_cond``), unless
        one set earlier fires before then (it looks again when it fires)."""
        timer = self._later_timer
        if timer is not None and timer[0] is loop:
            if timer[1] <= due + EARLY:
                return
            timer[2].cancel()
        handle = loop.call_later(max(0.0, due - time.monotonic()), self._hand_later)
        self._later_timer = (loop, due, handle)

    def _hand_later(self) -> None:
        """Records ``submit_later`` queued are due: to the writer, unless a write took them
        meanwhile; a later round's, not due yet, get the timer again for their due time."""
        with self._cond:
            self._later_timer = None
            due = self._later_due
            if due is None or self._handed:
                return
            if due - time.monotonic() <= EARLY:
                self._handed = True
                self._cond.notify()
                return
            self._later_at(asyncio.get_running_loop(), due)
