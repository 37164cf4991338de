"""The audit trail: one hash-chained JSON line per request, written or refused.

Each record carries ``seq`` and ``prev``, the SHA-256 (hex) of the previous
record's line without its newline; the first record ever has ``seq`` 1 and
``prev`` of 64 zeros. A file that continues the chain of another one (after
log rotation) starts with a record whose ``rotated_from`` equals its ``prev``.
On start-up the chain continues from the last record already in the file.

Writes happen in one writer thread, in batches (one write and one fsync for
all the records that queued up meanwhile). ``record`` waits at most
``write_timeout``; when the write fails or is late it raises
``AuditUnavailable`` and the caller refuses the operation. While the writer is
stuck in a write, ``record`` fails at once. After a failure the file is
reopened on the next attempt, so the trail recovers when the sink does.

A failed write may leave bytes in the file. They are never truncated away (the
file may be append-only); the next write accounts for them instead. Complete
records among them that still chain stay in the chain and are listed in the
next record's ``unacknowledged`` (the caller was refused); anything else is
named by the next record's ``discarded`` (byte count and SHA-256), so that
``verify_file`` can tell a failed write from an edit. Records whose caller
gave up while they were being written are listed in ``unacknowledged`` too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib
import json
import logging
import math
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ._calls import AuditEvent
from .errors import AuditUnavailable

__all__ = [
    "GENESIS",
    "AuditTrail",
    "VerifyReport",
    "audit_from_config",
    "verify_file",
    "verify_files",
]

log = logging.getLogger("signerd.audit")

GENESIS = "0" * 64
_MAX_BATCH = 256
_TAIL_WINDOW = 1 << 20  # how far back start-up looks for the last record
_MAX_REGION = 64 << 20  # unaccounted bytes a writer or verifier will hold

JournalSend = Callable[..., object]


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    first_bad_line: int | None = None
    problem: str | None = None
    path: str | None = None  # the file the problem is in, for verify_files


def audit_from_config(table: Mapping[str, Any]) -> AuditTrail:
    """Build an AuditTrail from the ``[audit]`` table; ValueError names the bad key."""
    known = ("path", "journald", "write_timeout", "fsync")
    for name in table:
        if name not in known:
            raise ValueError(f"audit: unknown key {name!r}")
    path = table.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("audit.path: required, the file the audit trail is appended to")
    timeout = table.get("write_timeout", 0.5)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 30:
        raise ValueError(f"audit.write_timeout: must be seconds in (0, 30], got {timeout!r}")
    flags = {}
    for name, default in (("journald", False), ("fsync", True)):
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"audit.{name}: must be true or false, got {value!r}")
        flags[name] = value
    send: JournalSend | None = None
    if flags["journald"]:
        try:
            journal = importlib.import_module("systemd.journal")
        except ImportError:
            raise ValueError(
                "audit.journald: needs systemd-python (pip install 'signerd[systemd]')"
            ) from None
        send = journal.send
    return AuditTrail(path, write_timeout=float(timeout), fsync=flags["fsync"], journal_send=send)


def _line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class _Walker:
    """Follows a chain line by line; the writer's recovery and the verifier share it.

    A line that does not continue the chain is held as unaccounted; a later
    record that continues the chain must name exactly those bytes in its
    ``discarded`` field, else they stay unaccounted (and the file is bad).
    """

    def __init__(self, prev: str | None, seq: int, *, file_start: bool) -> None:
        self.prev, self.seq = prev, seq  # prev None: predecessor unknown
        self.file_start = file_start  # the next record is the first of its file
        self.prev_line: int | None = None
        self.records = 0
        self.accepted: list[int] = []
        self.pending = bytearray()
        self.pending_line: int | None = None
        self.pending_problem: str | None = None

    def feed(self, line: bytes, lineno: int) -> None:
        problem, seq = self._check(line)
        if problem is None:
            self.prev, self.seq, self.prev_line = _line_hash(line), seq, lineno
            self.file_start = False
            self.records += 1
            self.accepted.append(seq)
            self.pending.clear()
            self.pending_line = self.pending_problem = None
            return
        if self.pending_line is None:
            self.pending_line, self.pending_problem = lineno, problem
        self.pending += line

    def _check(self, line: bytes) -> tuple[str | None, int]:
        if not line.endswith(b"\n"):
            return "unterminated record at the end of the file (a write that failed?)", 0
        try:
            rec = json.loads(line)
        except ValueError:
            return "not a JSON record", 0
        if not isinstance(rec, dict) or type(rec.get("seq")) is not int:
            return "not an audit record", 0
        seq, prev = rec["seq"], rec.get("prev")
        starts = (seq == 1 and prev == GENESIS) or rec.get("rotated_from") == prev
        if self.file_start and not starts:
            return f"the chain does not start here (seq {seq}): earlier records were removed", 0
        if self.prev is None:
            pass
        elif seq != self.seq + 1:
            return (
                f"seq {seq} where {self.seq + 1} was expected: records were deleted, "
                "inserted or reordered here"
            ), 0
        elif prev != self.prev:
            before = (
                f"line {self.prev_line}" if self.prev_line else "the previous file's last record"
            )
            return f"prev is not the hash of {before}: it was edited, or a record was inserted", 0
        discarded = rec.get("discarded")
        if self.pending:
            want = {"bytes": len(self.pending), "sha256": hashlib.sha256(self.pending).hexdigest()}
            if discarded != want:
                return "record does not account for the unaccounted lines before it", 0
        elif discarded is not None:
            return "record names discarded bytes that are not there", 0
        return None, seq


@dataclass(eq=False)
class _Job:
    event: AuditEvent
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
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


class AuditTrail:
    """Hash-chained JSON-lines audit file; implements the ``AuditSink`` protocol."""

    def __init__(
        self,
        path: str,
        *,
        write_timeout: float = 0.5,
        fsync: bool = True,
        journal_send: JournalSend | None = None,
    ) -> None:
        self.path = path
        self.write_timeout = write_timeout
        self._fsync = fsync
        self._journal = journal_send
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._thread: threading.Thread | None = None
        self._busy_since: float | None = None
        self._closed = False
        self._reopen = False
        self._sink = _Sink()
        self._journal_failing = False
        self._last_complaint = 0.0

    async def record(self, event: AuditEvent) -> None:
        """Write one record durably, or raise AuditUnavailable within write_timeout."""
        loop = asyncio.get_running_loop()
        job = _Job(event, loop, loop.create_future())
        with self._cond:
            if self._closed:
                raise AuditUnavailable()
            busy = self._busy_since
            if busy is not None and time.monotonic() - busy > self.write_timeout:
                raise AuditUnavailable()  # the writer is stuck: do not queue behind it
            self._start()
            self._queue.append(job)
            self._cond.notify()
        try:
            await asyncio.wait_for(asyncio.shield(job.future), self.write_timeout)
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

    # --- the writer thread ---

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed and not self._reopen:
                    self._cond.wait()
                reopen, self._reopen = self._reopen, False
                if not self._queue and self._closed:
                    break
                batch = [self._queue.popleft() for _ in range(min(_MAX_BATCH, len(self._queue)))]
                for job in batch:
                    job.state = "writing"
                self._busy_since = time.monotonic()
            if reopen:
                self._close_fd()
            lines: list[bytes] = []
            if batch:
                try:
                    lines = self._write_batch(batch)
                except Exception as exc:  # OSError mostly; never let the writer die
                    self._close_fd()
                    now = time.monotonic()
                    if now - self._last_complaint > 10.0:  # one line per streak, then 1/10 s
                        self._last_complaint = now
                        log.error("signerd.audit_write_failed error=%s path=%s", exc, self.path)
                else:
                    if self._last_complaint:
                        log.warning("signerd.audit_recovered path=%s", self.path)
                    self._last_complaint = 0.0
            with self._cond:
                self._busy_since = None
                for job in batch:
                    job.state, job.failed = "done", not lines
                    if lines and job.abandoned:
                        self._sink.unacked.append(job.seq)
            for job in batch:
                with contextlib.suppress(RuntimeError):  # the caller's loop is gone
                    job.loop.call_soon_threadsafe(_resolve, job.future)
            if lines and self._journal is not None:
                with self._cond:
                    self._busy_since = time.monotonic()  # a stuck journal is a stuck writer
                self._to_journal(lines)
                with self._cond:
                    self._busy_since = None
        self._close_fd()

    def _write_batch(self, batch: list[_Job]) -> list[bytes]:
        sink = self._sink
        if sink.fd is not None and sink.regular and self._path_moved():
            self._close_fd()
        if sink.fd is None:
            self._open()
        assert sink.fd is not None
        region, base = self._unaccounted()
        prefix = b"\n" if region and not region.endswith(b"\n") else b""
        walker = _Walker(sink.prev, sink.seq, file_start=base - len(region) == 0)
        for lineno, line in enumerate(_split_lines(region + prefix), 1):
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
        lines = []
        for job in batch:
            seq += 1
            line = _encode(job.event, seq, prev, marks)
            marks = {}
            prev, job.seq = _line_hash(line), seq
            lines.append(line)
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
        sink.rotated_from, sink.unacked = None, []
        sink.dangling.clear()
        return lines

    def _open(self) -> None:
        sink = self._sink
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
        sink.ident, sink.good_end = ident, 0
        sink.rotated_from = sink.prev if sink.seq > 0 else None  # the chain moves here
        if st.st_size > 0:
            self._load_tail(st.st_size)  # unless the file has a chain of its own
        log.info("signerd.audit_opened path=%s seq=%d", self.path, sink.seq)

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
                        _line_hash(line),
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
        if size < sink.good_end:  # truncated under us (copytruncate): a new file, in effect
            sink.good_end, sink.rotated_from = 0, sink.prev
        if size - sink.good_end > _MAX_REGION:
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


def _split_lines(data: bytes) -> list[bytes]:
    """Lines with their b"\\n", split the way reading the file in binary splits them."""
    lines = [part + b"\n" for part in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _encode(event: AuditEvent, seq: int, prev: str, marks: Mapping[str, object]) -> bytes:
    peer = event.peer
    when = event.time if math.isfinite(event.time) else 0.0
    record: dict[str, object] = {
        "v": 1,
        "seq": seq,
        "prev": prev,
        "time": round(when, 6),
        "ts": datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "request_id": event.request_id,
        "peer": {
            "pid": peer.pid,
            "uid": peer.uid,
            "gid": peer.gid,
            "groups": list(peer.groups),
            "user": peer.user,
            "unit": peer.unit,
        },
        "operation": event.operation,
        "tenant": event.tenant,
        "key": event.key,
        "kid": event.kid,
        "payload_sha256": list(event.payload_sha256),
        "outcome": event.outcome,
        "status": event.status,
        "reason": event.reason,
        **({"security": True} if event.security else {}),
        **marks,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _journal_fields(line: bytes) -> dict[str, str]:
    """A record as journal fields: SIGNERD_SEQ, SIGNERD_PEER_UID, ..., and its own hash."""
    record = json.loads(line)
    peer = record.pop("peer")
    record.update({f"peer_{name}": value for name, value in peer.items()})
    status = record["status"]
    fields = {
        "MESSAGE": f"signerd audit {record['operation']} {record['outcome']}",
        "PRIORITY": "4"
        if record.get("security")
        else "6"
        if status < 400
        else "4"
        if status in (401, 403, 429)
        else "5"
        if status < 500
        else "3",
        "SYSLOG_IDENTIFIER": "signerd",
        "SIGNERD_HASH": _line_hash(line),  # anchors the file's chain outside the file
    }
    for name, value in record.items():
        text = " ".join(map(str, value)) if isinstance(value, list) else value
        if text is not None and text != "":
            fields[f"SIGNERD_{name.upper()}"] = str(text)
    return fields


def verify_file(path: str) -> VerifyReport:
    """Check one audit file's chain; say where it first breaks."""
    return verify_files([path])


def verify_files(paths: Sequence[str]) -> VerifyReport:
    """Check audit files that follow each other (oldest first), and the links between them."""
    total = 0
    walker: _Walker | None = None
    for path in paths:
        if walker is None:
            walker = _Walker(None, 0, file_start=True)
        else:  # the next file continues the chain, starting with a rotated_from record
            walker = _Walker(walker.prev, walker.seq, file_start=True)
        try:
            with open(path, "rb") as handle:
                bad = _walk(walker, handle)
        except OSError as exc:
            return VerifyReport(False, total, None, f"cannot read: {exc.strerror}", path)
        total += walker.records
        if bad is not None:
            return VerifyReport(False, total, bad[0], bad[1], path)
    return VerifyReport(True, total, None, None, paths[-1] if paths else None)


def _walk(walker: _Walker, lines: Iterable[bytes]) -> tuple[int, str] | None:
    for lineno, line in enumerate(lines, 1):
        walker.feed(line, lineno)
        if len(walker.pending) > _MAX_REGION:
            break
    if walker.pending_line is not None:
        return walker.pending_line, walker.pending_problem or "unaccounted bytes"
    return None
