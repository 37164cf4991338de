"""The audit trail: one hash-chained JSON line per request, written or refused.

Format: ``_chain``; verification: ``_check``; anchors and the payload key: ``_anchor``,
``_anchorer``; the file, its recovery, rotation versus deletion: ``_trailfile``; handing
records over on the event loop and waiting for them: ``_loopside``. On
start-up the chain continues from the last record already in the file.

Writes are batched (one write and one fsync for the records queued meanwhile) on one
writer thread. A record written ahead (``ahead``: a sign's ``intent``) goes to it at
once, so its fsync runs while the caller signs. In a worker (``stall_guard`` set) a lone
record of one loop turn is written at the end of that turn on the loop's own thread; a
group still goes to the writer thread, so the loop signs on while the disk works. The
writer thread also keeps the anchors, reopening, the journal and the records nobody
waits for. ``record`` waits at most ``write_timeout``; a failed or late write raises
``AuditUnavailable`` and the operation is refused (a late write on the loop's thread is
the stall guard's: the worker answers 503 and ends); while the writer is stuck in a
write, ``record`` fails at once. After a failure the file is reopened on the next try.

Anchors are written at start (``open``), every ``anchor_interval`` seconds when the head
moved, before leaving a file (rotation by rename, noticed on SIGHUP, before a batch or on
the anchor tick), at shutdown, and at once when the live file shrank or was deleted under
it (``signerd.audit_truncated``, ``signerd.audit_deleted``); the same tick checks that
the anchor file is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import AuditUnavailable
from ._anchor import RUN
from ._anchorer import Anchorer
from ._events import AuditEvent
from ._loopside import LoopSide
from ._pending import Ahead, Job, resolve, resolve_all
from ._trailfile import Sink, TrailFile

__all__ = ["AuditTrail"]

if TYPE_CHECKING:
    from ..workers import StallGuard

log = logging.getLogger("signerd.audit")

_MAX_BATCH = 256
#: records written on the loop's thread at most at once (a lone caller); a group goes to the
#: writer thread, so the loop signs on while the disk works (measured: more throughput)
_MAX_HERE = 1
_MAX_QUEUED = 8192  # records nobody waits for (``submit``), queued at most
JournalSend = Callable[..., object]


class AuditTrail(TrailFile, LoopSide):
    """Hash-chained JSON-lines audit file; implements the ``AuditSink`` protocol."""

    def __init__(
        self,
        path: str,
        *,
        write_timeout: float = 2.0,
        fsync: bool = True,
        journal_send: JournalSend | None = None,
        anchor_path: str | None = None,
        anchor_interval: float = 10.0,
        key_path: str | None = None,
        hmac_key: bytes | None = None,
        chains: tuple[str, ...] = (),
        run: str = RUN,
        stall_guard: StallGuard | None = None,
    ) -> None:
        """``anchor_path`` None: no anchors. No ``key_path`` nor ``hmac_key``: a key for this
        process only (payload_hmac values then cannot be checked later; for tests).
        ``chains``: every chain of the daemon run (default: this one), named by each anchor."""
        self.path = path
        self.write_timeout = write_timeout
        self._fsync = fsync
        self._journal = journal_send
        self.chain = os.path.basename(path)
        self.boot = secrets.token_hex(8)  # with seq, makes record_id unique across restarts
        self.anchor_path, self.anchor_interval = anchor_path, anchor_interval
        self._anchors = (
            Anchorer(anchor_path, self.chain, self.boot, journal_send, run=run, chains=chains)
            if anchor_path is not None
            else None
        )
        self._next_anchor = time.monotonic() + anchor_interval
        self.key_path = key_path
        self._key: bytes | None = (
            hmac_key if hmac_key is not None or key_path else secrets.token_bytes(32)
        )
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._closed = False
        self._reopen = False
        self._sink = Sink()
        self._started = False  # whether the file was opened once (start-up checks done)
        self._journal_failing = False
        self._last_complaint = 0.0
        self._io = threading.Lock()  # held by whichever thread uses the file and the chain
        self._journal_backlog: deque[bytes] = deque()  # written on the loop, for the journal
        self._flush_due = False
        self._hand_due = False  # a hand-over of records written ahead is scheduled
        self._handed = False  # queued records are the writer thread's to write now
        self._later_due: float | None = None  # when records queued ``submit_later`` are due
        #: the timer that hands them over (its loop, when, handle): one at a time
        self._later_timer: tuple[asyncio.AbstractEventLoop, float, asyncio.TimerHandle] | None = (
            None
        )
        #: a worker's guard: records are written on the loop's thread, bounded by it
        self.stall_guard = stall_guard

    async def record(self, event: AuditEvent) -> None:
        """Write one record durably, or raise AuditUnavailable within write_timeout."""
        await self._wait(self._enqueue(event, self.stall_guard is not None), self.write_timeout)

    def ahead(self, event: AuditEvent, group: bool = False) -> Ahead:
        """Queue a record for the writer thread now, ahead of the operation it announces:
        it is written and fsync'd while the caller goes on (the token signs meanwhile).
        ``group``: at the end of this loop turn, with the records the turn's other requests
        queue (one write, one fsync). AuditUnavailable at once when the trail is closed or
        its writer stuck."""
        return Ahead(self._enqueue(event, False, group), self._wait, self.write_timeout)

    def _enqueue(self, event: AuditEvent, here: bool, group: bool = False) -> Job:
        """Queue ``event`` for the loop's end of turn (``here``) or the writer thread (at
        once, or with ``group`` at the end of this turn)."""
        loop = asyncio.get_running_loop()
        job = Job(event, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise AuditUnavailable()
            if self._stuck():
                raise AuditUnavailable()  # the writer is stuck: do not queue behind it
            self._start()
            self._queue.append(job)
            if not here and not group:
                self._handed = True
                self._cond.notify()
            elif not here and not self._hand_due:
                # to the writer once the rest of this loop turn has queued its records too:
                # one write and one fsync for the group, while its signatures are made
                self._hand_due = True
                loop.call_soon(self._hand_ahead)
        if here and not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._write_here)  # after every request of this loop turn
        return job

    def backlog(self) -> tuple[int, bool]:
        """(records waiting to be written, whether the writer is stuck or closed)."""
        with self._cond:
            return len(self._queue), self._closed or self._stuck()

    def _stuck(self) -> bool:
        """Whether a write has been under way longer than ``write_timeout`` (hold ``_cond``)."""
        busy = self._busy_since
        return busy is not None and time.monotonic() - busy > self.write_timeout

    def submit(self, event: AuditEvent, *, later: bool = False) -> bool:
        """Queue a record that nobody waits for (an operation that does not fail closed):
        it goes out with the next group write. ``later``: not a write of its own either; it
        joins the next one, within ``_loopside.LATER`` s, or at once when a full batch waits.
        False, and nothing queued, when the writer is closed or stuck or ``_MAX_QUEUED``
        records already wait."""
        with self._cond:
            if self._closed or len(self._queue) >= _MAX_QUEUED or self._stuck():
                return False
            self._start()
            self._queue.append(Job(event, None, None))
            if not later or len(self._queue) >= _MAX_BATCH:  # a full batch goes now
                self._handed = True
                self._cond.notify()
            elif self._later_due is None:
                self._remind_later()
        return True

    def submit_later(self, event: AuditEvent) -> bool:
        """``submit(event, later=True)``."""
        return self.submit(event, later=True)

    def write_now(self, events: list[AuditEvent], timeout: float) -> int:
        """From the stall guard's thread (the process ends next): the first ``_MAX_BATCH`` of
        ``events`` written durably now, after what is queued and not written yet (records
        ``submit_later`` holds back for a loop timer that a stuck loop never runs); how many
        of ``events`` were written (0 when the file is not free within ``timeout``)."""
        if not events or not self._io.acquire(timeout=timeout):
            return 0
        try:
            with self._cond:
                queued = [] if self._reopen else self._take()
            jobs = [Job(e, None, None) for e in events[:_MAX_BATCH]]
            lines = self._write_jobs(queued + jobs)
            with self._cond:
                self._done(queued, lines)
            return len(jobs) if lines else 0
        finally:
            self._io.release()

    def open(self) -> None:
        """Open the file and the anchors now (at start): the chain is anchored ``start`` and
        the anchor tick runs even before the first record. A failure is logged; the trail
        tries again with the first record (and refuses it if it still cannot)."""
        with self._io:
            if self._sink.fd is None:
                try:
                    self._open()
                except OSError as exc:
                    log.error("signerd.audit_write_failed error=%s path=%s", exc, self.path)
        with self._cond:
            self._start()

    def reopen(self) -> None:
        """SIGHUP: when ``path`` no longer names our file, the next record goes to whatever
        file it names then (a file renamed away is a rotation; a deleted one is not)."""
        with self._cond:
            self._reopen = True
            self._start()
            self._cond.notify()

    async def aclose(self) -> None:
        """Write what is queued, then stop the writer (waiting a bounded time)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, self.write_timeout + 5.0)

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="signerd-audit", daemon=True)
            self._thread.start()

    # --- writing on the loop's thread (a worker) ---

    def _write_here(self) -> None:
        """A lone record queued in this loop turn: written and fsync'd on this thread.
        Several records, or a file the writer thread has now: the writer thread's."""
        self._flush_due = False
        guard = self.stall_guard
        batch: list[Job] = []
        lines: list[bytes] = []
        if guard is not None and len(self._queue) <= _MAX_HERE and self._io.acquire(False):
            try:
                with self._cond:
                    if not self._reopen:  # reopening is the writer thread's
                        batch = self._take()
                if batch:
                    lines = guard.call(
                        lambda: self._write_jobs(batch),
                        self.write_timeout,
                        "audit",
                        AuditUnavailable,
                    )
            finally:
                self._io.release()
        with self._cond:
            if batch:
                self._done(batch, lines)
                if lines and self._journal is not None:
                    self._journal_backlog.extend(lines)
            if self._queue or self._journal_backlog:
                self._handed = self._handed or bool(self._queue)
                self._cond.notify()  # what is left, and the journal, go to the writer thread
        for job in batch:
            if job.future is not None:
                resolve(job.future)

    # --- the writer thread ---

    def _take(self) -> list[Job]:
        """The next batch from the queue (hold ``_cond`` and ``_io``)."""
        batch = [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]
        self._later_due = self._later_due if self._queue else None
        for job in batch:
            job.state = "writing"
        if batch:
            self._busy_since = time.monotonic()
        return batch

    def _done(self, batch: list[Job], lines: list[bytes]) -> None:
        """The batch is written (``lines``) or failed (none) (hold ``_cond``)."""
        self._busy_since = None
        for job in batch:
            job.state, job.failed = "done", not lines
            if lines and job.abandoned:
                self._sink.unacked.append(job.seq)

    def _write_jobs(self, batch: list[Job]) -> list[bytes]:
        """Write a batch (hold ``_io``); its lines, or none when the write failed."""
        try:
            lines = self._write_batch(batch)
        except Exception as exc:  # OSError mostly; never let the writer die
            self._close_fd()
            now = time.monotonic()
            if now - self._last_complaint > 10.0:  # one line per streak, then 1/10 s
                self._last_complaint = now
                log.error("signerd.audit_write_failed error=%s path=%s", exc, self.path)
            return []
        if self._last_complaint:
            log.warning("signerd.audit_recovered path=%s", self.path)
        self._last_complaint = 0.0
        return lines

    def _busy(self, fn: Callable[..., object], *args: Any) -> None:
        """Something callers do not wait for, counted as the writer being busy (stuck)."""
        with self._cond:
            self._busy_since = time.monotonic()
        fn(*args)
        with self._cond:
            self._busy_since = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while (
                    not (self._queue and self._handed)
                    and not self._closed
                    and not self._reopen
                    and not self._journal_backlog
                ):
                    due = [self._next_anchor] if self._anchors is not None else []
                    due += [self._later_due] if self._later_due is not None else []
                    wait = min(due) - time.monotonic() if due else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                reopen, self._reopen = self._reopen, False
                if not self._queue and self._closed:
                    break
                backlog = list(self._journal_backlog)
                self._journal_backlog.clear()
            with self._io:
                if reopen:
                    self._follow(reopen=True)
                with self._cond:
                    batch = self._take()
                    self._handed = self._handed and bool(self._queue)
                lines = self._write_jobs(batch) if batch else []
            with self._cond:
                self._done(batch, lines)
            waiting: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
            for job in batch:
                if job.loop is not None and job.future is not None:
                    waiting.setdefault(job.loop, []).append(job.future)
            for loop, futures in waiting.items():  # one wake-up per loop, not per record
                with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                    loop.call_soon_threadsafe(resolve_all, futures)
            backlog += lines
            if backlog and self._journal is not None:
                self._busy(self._to_journal, backlog)  # a stuck journal is a stuck writer
            if self._anchors is not None and time.monotonic() >= self._next_anchor:
                # after the batch is answered: no caller waits for an anchor
                self._next_anchor = time.monotonic() + self.anchor_interval
                with self._io:
                    self._busy(self._tick)
        with self._io:
            self._anchor("shutdown")
            self._close_fd()
        if self._anchors is not None:
            self._anchors.close()
