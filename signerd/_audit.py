"""The audit trail: one hash-chained JSON line per request, written or refused.

The chain's format and its verification live in ``_chain``; the anchors kept
outside the file and the payload key in ``_anchor``. On start-up the chain
continues from the last record already in the file.

Writes happen in batches (one write and one fsync for all the records that
queued up meanwhile), in one writer thread. In a worker (``stall_guard``
set), a lone record of one loop turn (one caller) is written at the end of
that turn on the event loop's own thread, without a hand-off to another
thread and back; a group of records still goes to the writer thread, so that
the loop goes on signing while the disk works. The writer thread also keeps
the anchors, reopening, the journal and the records nobody waits for.
``record`` waits at most ``write_timeout``; when the write fails or is late
it raises ``AuditUnavailable`` and the caller refuses the operation (a write
on the loop's thread that is late is the stall guard's: the worker answers
503 and ends). While the writer is stuck in a write, ``record`` fails at once. After a failure the file is
reopened on the next attempt, so the trail recovers when the sink does.

A failed write may leave bytes in the file. They are never truncated away (the
file may be append-only); the next write accounts for them instead. Complete
records among them that still chain stay in the chain and are listed in the
next record's ``unacknowledged`` (the caller was refused); anything else is
named by the next record's ``discarded`` (byte count and SHA-256), so that
verification can tell a failed write from an edit. Records whose caller gave
up while they were being written are listed in ``unacknowledged`` too.

The same thread writes the anchors: every ``anchor_interval`` seconds when the
head moved, before leaving a file (rotation by rename, SIGHUP), at shutdown,
and at once when the live file shrank under it (copytruncate or tampering),
which is logged as the security event ``signerd.audit_truncated``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._anchor import Anchorer, load_or_create_key
from ._auditconf import audit_settings, worker_path
from ._calls import AuditEvent
from ._chain import (
    GENESIS,
    MAX_REGION,
    VerifyReport,
    Walker,
    _encode,
    _journal_fields,
    line_hash,
    split_lines,
    verify_file,
    verify_files,
)
from .errors import AuditUnavailable

__all__ = [
    "GENESIS",
    "AuditTrail",
    "VerifyReport",
    "audit_from_config",
    "verify_file",
    "verify_files",
    "worker_path",
]

if TYPE_CHECKING:
    from .workers import StallGuard

log = logging.getLogger("signerd.audit")

_MAX_BATCH = 256
#: records written on the loop's thread at most at once: one record is a lone caller,
#: who waits for nothing else; a group goes to the writer thread, so that the loop
#: signs the next requests while the disk works (measured: more throughput at 32
#: callers, the same latency for one)
_MAX_HERE = 1
_MAX_QUEUED = 8192  # records nobody waits for (``submit``), queued at most
_TAIL_WINDOW = 1 << 20  # how far back start-up looks for the last record
JournalSend = Callable[..., object]


def audit_from_config(table: Mapping[str, Any], *, worker: int | None = None) -> AuditTrail:
    """Build an AuditTrail from the ``[audit]`` table; ValueError names the bad key.

    With ``worker``, the trail is that worker's own file (``worker_path``) and, unless
    ``anchor`` is set, its own anchor file; the payload key is shared by all workers.
    """
    s = audit_settings(table, worker=worker)
    return AuditTrail(
        s.path,
        write_timeout=s.write_timeout,
        fsync=s.fsync,
        journal_send=s.journal_send,
        anchor_path=s.anchor,
        anchor_interval=s.anchor_interval,
        key_path=s.key,
    )


@dataclass(eq=False)
class _Job:
    event: AuditEvent
    loop: asyncio.AbstractEventLoop | None  # None for a record nobody waits for (``submit``)
    future: asyncio.Future[None] | None
    state: str = "queued"  # queued -> writing -> done; or queued -> abandoned
    abandoned: bool = False  # the caller gave up while the record was being written
    failed: bool = False
    seq: int = 0


@dataclass
class _Sink:
    """The writer thread's view of the file; touched by that thread only."""

    fd: int | None = None
    ident: tuple[int, int] | None = None
    regular: bool = True
    good_end: int = 0  # offset after the last acknowledged record
    prev: str = GENESIS
    seq: int = 0
    rotated_from: str | None = None  # set when the chain moved to a new file
    unacked: list[int] = field(default_factory=list)
    dangling: bytearray = field(default_factory=bytearray)  # unacknowledged bytes, non-files
    first: tuple[int, str] | None = None  # the file's first record: seq, hash


class AuditTrail:
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
    ) -> None:
        """``anchor_path`` None: no anchors. No ``key_path`` nor ``hmac_key``: a key for this
        process only (payload_hmac values then cannot be checked later; for tests)."""
        self.path = path
        self.write_timeout = write_timeout
        self._fsync = fsync
        self._journal = journal_send
        self.chain = os.path.basename(path)
        self.boot = secrets.token_hex(8)  # with seq, makes record_id unique across restarts
        self.anchor_path, self.anchor_interval = anchor_path, anchor_interval
        self._anchors = (
            Anchorer(anchor_path, self.chain, self.boot, journal_send)
            if anchor_path is not None
            else None
        )
        self._next_anchor = time.monotonic() + anchor_interval
        self.key_path = key_path
        self._key: bytes | None = (
            hmac_key if hmac_key is not None or key_path else secrets.token_bytes(32)
        )
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._closed = False
        self._reopen = False
        self._sink = _Sink()
        self._started = False  # whether the file was opened once (start-up checks done)
        self._journal_failing = False
        self._last_complaint = 0.0
        self._io = threading.Lock()  # held by whichever thread uses the file and the chain
        self._journal_backlog: deque[bytes] = deque()  # written on the loop, for the journal
        self._flush_due = False
        self._handed = False  # with a guard: queued records are the writer thread's to write
        #: a worker's guard: records are written on the loop's thread, bounded by it
        self.stall_guard: StallGuard | None = None

    async def record(self, event: AuditEvent) -> None:
        """Write one record durably, or raise AuditUnavailable within write_timeout."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        job = _Job(event, loop, future)
        here = self.stall_guard is not None
        with self._cond:
            if self._closed:
                raise AuditUnavailable()
            if self._stuck():
                raise AuditUnavailable()  # the writer is stuck: do not queue behind it
            self._start()
            self._queue.append(job)
            if not here:
                self._cond.notify()
        if here and not self._flush_due:
            self._flush_due = True
            loop.call_soon(self._write_here)  # after every request of this loop turn
        try:
            await asyncio.wait_for(asyncio.shield(future), self.write_timeout)
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
        if job.failed:
            raise AuditUnavailable()

    def _stuck(self) -> bool:
        """Whether a write has been under way longer than ``write_timeout`` (hold ``_cond``)."""
        busy = self._busy_since
        return busy is not None and time.monotonic() - busy > self.write_timeout

    def submit(self, event: AuditEvent) -> bool:
        """Queue a record that nobody waits for (an operation that does not fail closed):
        it goes out with the next group write. False, and nothing queued, when the writer
        is closed or stuck or ``_MAX_QUEUED`` records already wait."""
        with self._cond:
            if self._closed or len(self._queue) >= _MAX_QUEUED or self._stuck():
                return False
            self._start()
            self._queue.append(_Job(event, None, None))
            self._handed = True
            self._cond.notify()
        return True

    def reopen(self) -> None:
        """Close the file; the next record goes to whatever file ``path`` names then."""
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
        batch: list[_Job] = []
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
                _resolve(job.future)

    # --- the writer thread ---

    def _take(self) -> list[_Job]:
        """The next batch from the queue (hold ``_cond`` and ``_io``)."""
        batch = [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]
        for job in batch:
            job.state = "writing"
        if batch:
            self._busy_since = time.monotonic()
        return batch

    def _done(self, batch: list[_Job], lines: list[bytes]) -> None:
        """The batch is written (``lines``) or failed (none) (hold ``_cond``)."""
        self._busy_since = None
        for job in batch:
            job.state, job.failed = "done", not lines
            if lines and job.abandoned:
                self._sink.unacked.append(job.seq)

    def _write_jobs(self, batch: list[_Job]) -> list[bytes]:
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
                    not (self._queue and (self._handed or self.stall_guard is None))
                    and not self._closed
                    and not self._reopen
                    and not self._journal_backlog
                ):
                    wait = (
                        self._next_anchor - time.monotonic() if self._anchors is not None else None
                    )
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
                    self._anchor("rotated")  # the old file's last head, before leaving it
                    self._close_fd()
                with self._cond:
                    batch = self._take()
                    self._handed = self._handed and bool(self._queue)
                lines = self._write_jobs(batch) if batch else []
            with self._cond:
                self._done(batch, lines)
            for job in batch:
                if job.loop is not None and job.future is not None:
                    with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                        job.loop.call_soon_threadsafe(_resolve, job.future)
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

    def _write_batch(self, batch: list[_Job]) -> list[bytes]:
        sink = self._sink
        if sink.fd is not None and sink.regular and self._path_moved():
            self._anchor("rotated")
            self._close_fd()
        if sink.fd is None:
            self._open()
        assert sink.fd is not None
        region, base = self._unaccounted()
        prefix = b"\n" if region and not region.endswith(b"\n") else b""
        walker = Walker(sink.prev, sink.seq, file_start=base - len(region) == 0)
        for lineno, line in enumerate(split_lines(region + prefix), 1):
            walker.feed(line, lineno)
        assert walker.prev is not None
        marks: dict[str, object] = {}
        if walker.pending:
            marks["discarded"] = {
                "bytes": len(walker.pending),
                "sha256": hashlib.sha256(walker.pending).hexdigest(),
            }
        unacked = sink.unacked + walker.accepted
        if unacked:
            marks["unacknowledged"] = unacked
        if sink.rotated_from is not None and not walker.accepted:
            marks["rotated_from"] = sink.rotated_from
        prev, seq = walker.prev, walker.seq
        out = bytearray(prefix)
        lines: list[bytes] = []
        first_hash = ""
        for job in batch:
            seq += 1
            line = _encode(job.event, seq, prev, marks, f"{self.boot}-{seq}", self._key)
            marks = {}
            prev, job.seq = line_hash(line), seq
            lines.append(line)
            first_hash = first_hash or prev
            out += line + b"\n"
        written = 0
        try:
            while written < len(out):
                written += os.write(sink.fd, out[written:])
            if self._fsync and sink.regular:
                os.fsync(sink.fd)
        except OSError:
            if not sink.regular:
                sink.dangling += out[:written]
            raise
        sink.prev, sink.seq, sink.good_end = prev, seq, base + len(out)
        if sink.first is None:
            sink.first = walker.first[::2] if walker.first else (seq - len(lines) + 1, first_hash)
        sink.rotated_from, sink.unacked = None, []
        sink.dangling.clear()
        return lines

    def _open(self) -> None:
        sink = self._sink
        if self._key is None:
            assert self.key_path is not None
            try:
                self._key = load_or_create_key(self.key_path)
            except ValueError as exc:
                raise OSError(f"audit key: {exc}") from None
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o640)  # O_NONBLOCK: a FIFO without reader fails now
        except FileNotFoundError:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), 0o750, exist_ok=True)
            fd = os.open(self.path, flags, 0o640)
        st = os.fstat(fd)
        sink.fd, sink.regular = fd, stat.S_ISREG(st.st_mode)
        ident = (st.st_dev, st.st_ino)
        if not sink.regular or ident == sink.ident:
            return
        sink.dangling.clear()
        sink.ident, sink.good_end, sink.first = ident, 0, None
        sink.rotated_from = sink.prev if sink.seq > 0 else None  # the chain moves here
        if st.st_size > 0:
            self._load_tail(st.st_size)  # unless the file has a chain of its own
            sink.first = self._first_record()
        if not self._started:
            self._started = True
            self._behind_anchor()
        log.info("signerd.audit_opened path=%s seq=%d", self.path, sink.seq)

    def _behind_anchor(self) -> None:
        """At start: a file that lacks the head its last anchor names lost records meanwhile."""
        sink = self._sink
        last = self._anchors.latest() if self._anchors is not None else None
        if last is None or last.seq < sink.seq or (last.seq, last.head) == (sink.seq, sink.prev):
            return
        log.critical(
            "signerd.audit_truncated path=%s head_seq=%d anchored_seq=%d detail=the file does not "
            "end with the last anchored record (records lost or edited while signerd was "
            "stopped, or the file was rotated then); the chain continues from the anchor",
            self.path,
            sink.seq,
            last.seq,
        )
        assert self._anchors is not None
        self._anchors.lost(last)
        sink.prev, sink.seq, sink.rotated_from = last.head, last.seq, last.head

    def _load_tail(self, size: int) -> None:
        """Continue the chain from the last record already in the file."""
        start = max(0, size - _TAIL_WINDOW)
        data = self._read(start, size - start)
        offset = len(data)
        while offset > 0:
            begin = data.rfind(b"\n", 0, offset - 1) + 1
            line = data[begin:offset]
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if line.endswith(b"\n") and isinstance(rec, dict) and type(rec.get("seq")) is int:
                    sink = self._sink
                    sink.prev, sink.seq, sink.good_end = (
                        line_hash(line),
                        rec["seq"],
                        start + offset,
                    )
                    sink.rotated_from = None
                    return
            offset = begin
        if start > 0:
            raise OSError(f"no audit record in the last {_TAIL_WINDOW} bytes of {self.path}")

    def _unaccounted(self) -> tuple[bytes, int]:
        """Bytes after the last acknowledged record, and the offset where the next write lands."""
        sink = self._sink
        if not sink.regular:
            return bytes(sink.dangling), 0
        assert sink.fd is not None
        size = os.fstat(sink.fd).st_size
        if size < sink.good_end:  # truncated under us: a new file, in effect
            self._shrank(size)
        if size - sink.good_end > MAX_REGION:
            raise OSError(f"{size - sink.good_end} unaccounted bytes at the end of {self.path}")
        return self._read(sink.good_end, size - sink.good_end), size

    def _read(self, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        rfd = os.open(f"/proc/self/fd/{self._sink.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = []
            while length > 0 and (chunk := os.pread(rfd, min(length, 1 << 20), offset)):
                chunks.append(chunk)
                offset += len(chunk)
                length -= len(chunk)
            return b"".join(chunks)
        finally:
            os.close(rfd)

    def _path_moved(self) -> bool:
        """Whether ``path`` no longer names our file (rotated, deleted, replaced)."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._sink.ident

    def _first_record(self) -> tuple[int, str] | None:
        """The seq and hash of the first record in the open file, if it starts with one."""
        for line in split_lines(self._read(0, _TAIL_WINDOW)):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if line.endswith(b"\n") and isinstance(rec, dict) and type(rec.get("seq")) is int:
                    return rec["seq"], line_hash(line)
        return None

    def _tick(self) -> None:
        """On the anchor schedule: notice a live file that shrank, anchor a head that moved."""
        sink = self._sink
        if sink.fd is not None and sink.regular:
            try:
                size = os.fstat(sink.fd).st_size
            except OSError:
                size = sink.good_end
            if size < sink.good_end:
                self._shrank(size)
                return
        self._anchor("schedule")

    def _shrank(self, size: int) -> None:
        """The live file lost bytes under us: a security event, never a silent rotation."""
        sink = self._sink
        log.critical(
            "signerd.audit_truncated path=%s size=%d expected=%d head_seq=%d first_seq=%s "
            "detail=the live audit file shrank (copytruncate or tampering); records may be lost",
            self.path,
            size,
            sink.good_end,
            sink.seq,
            sink.first[0] if sink.first else "-",
        )
        self._anchor("truncated")
        sink.good_end, sink.rotated_from, sink.first = 0, sink.prev, None

    def _anchor(self, kind: str) -> None:
        if self._anchors is not None:
            sink = self._sink
            self._anchors.anchor(kind, sink.seq, sink.prev, sink.first, sink.ident)

    def _close_fd(self) -> None:
        fd, self._sink.fd = self._sink.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _to_journal(self, lines: list[bytes]) -> None:
        assert self._journal is not None
        try:
            for line in lines:
                self._journal(**_journal_fields(line))
        except Exception as exc:  # the file is the record of truth; say so once
            if not self._journal_failing:
                log.warning("signerd.audit_journal_failed error=%s", exc)
            self._journal_failing = True
        else:
            self._journal_failing = False


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
