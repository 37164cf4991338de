"""The audit trail's file: opening it, continuing its chain, writing records to it, and
noticing it change under us.

A failed write may leave bytes in the file. They are never truncated away (the
file may be append-only); the next write accounts for them instead. Complete
records among them that still chain stay in the chain and are listed in the
next record's ``unacknowledged`` (the caller was refused); anything else is
named by the next record's ``discarded`` (byte count and SHA-256), so that
verification can tell a failed write from an edit. Records whose caller gave
up while they were being written are listed in ``unacknowledged`` too.

The trail (``_trail.AuditTrail``) holds one file open. Whatever the path names
may change while signerd runs, and each change is told apart:

- renamed away (log rotation; the file still has a name): the old file's head
  is anchored ``rotated`` and the chain continues in the file the path names
  next, whose first record carries ``rotated_from``;
- deleted (our file has no name left: removed, or another file moved over it):
  never a rotation. It is logged at CRITICAL as ``signerd.audit_deleted``, its
  head anchored ``deleted`` (verification then requires those records, from a
  copy), and the chain continues in a new file;
- cut shorter (copytruncate, or tampering): ``signerd.audit_truncated``,
  anchored ``truncated``.

This is looked at before each batch, on SIGHUP and on every anchor tick.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ._anchor import Anchor, load_or_create_key
from ._anchorer import Anchorer, Head
from ._chain import (
    GENESIS,
    MAX_REGION,
    Walker,
    encode_record,
    journal_fields,
    line_hash,
    split_lines,
)
from ._events import AuditEvent

__all__ = ["Pending", "Sink", "TrailFile"]

log = logging.getLogger("signerd.audit")

_TAIL_WINDOW = 1 << 20  # how far back start-up looks for the last record


@dataclass
class Sink:
    """The writer's view of the file; touched by whoever holds the trail's ``_io`` lock."""

    fd: int | None = None
    ident: tuple[int, int] | None = None
    regular: bool = True
    good_end: int = 0  # offset after the last acknowledged record
    prev: str = GENESIS
    seq: int = 0
    rotated_from: str | None = None  # set when the chain moved to a new file
    unacked: list[int] = field(default_factory=list)
    dangling: bytearray = field(default_factory=bytearray)  # unacknowledged bytes, non-files
    first: tuple[int, str] | None = None  # the first record of the file the head is in
    fresh: bool = False  # the open file has no record yet (``first`` is the previous file's)


class Pending(Protocol):
    """A record being written: its event, and the seq it is given."""

    event: AuditEvent
    seq: int


class TrailFile:
    """The file side of ``AuditTrail`` (a mixin: callers hold ``_io``)."""

    path: str
    key_path: str | None
    boot: str
    _fsync: bool
    _key: bytes | None
    _anchors: Anchorer | None
    _sink: Sink
    _started: bool
    _journal: Callable[..., object] | None
    _journal_failing: bool

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
        sink.ident, sink.good_end, sink.fresh = ident, 0, True
        sink.rotated_from = sink.prev if sink.seq > 0 else None  # the chain moves here
        if st.st_size > 0:
            self._load_tail(st.st_size)  # unless the file has a chain of its own
            sink.first, sink.fresh = self._first_record(), False
        if not self._started:
            self._started = True
            self._begin()
        log.info("signerd.audit_opened path=%s seq=%d", self.path, sink.seq)

    def _write_batch(self, batch: Sequence[Pending]) -> list[bytes]:
        """Write the records of ``batch`` (numbering them) after accounting for any bytes a
        failed write left; their lines. OSError when the write fails."""
        sink = self._sink
        self._follow()  # never write into a file renamed away or deleted
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
            line = encode_record(job.event, seq, prev, marks, f"{self.boot}-{seq}", self._key)
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
        if sink.first is None or sink.fresh:
            sink.first = walker.first[::2] if walker.first else (seq - len(lines) + 1, first_hash)
            sink.fresh = False
        sink.rotated_from, sink.unacked = None, []
        sink.dangling.clear()
        return lines

    def _begin(self) -> None:
        """At start: a file that lacks the head its last anchor names lost records meanwhile;
        then the chain is anchored ``start`` (at seq 0 when it has no record yet)."""
        if self._anchors is None:
            return
        sink = self._sink
        last = self._anchors.start(records=sink.seq > 0)
        if last is not None and last.seq >= sink.seq and last.head != sink.prev:
            self._behind(last)
        self._anchor("start")

    def _behind(self, last: Anchor) -> None:
        sink = self._sink
        log.critical(
            "signerd.audit_truncated path=%s head_seq=%d anchored_seq=%d detail=%s",
            self.path,
            sink.seq,
            last.seq,
            "the file does not end with the last anchored record (records lost or edited "
            "while signerd was stopped, or the file was rotated then); the chain continues "
            "from the anchor",
        )
        assert self._anchors is not None
        self._anchors.behind(last)
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

    def _first_record(self) -> tuple[int, str] | None:
        """The seq and hash of the first record in the open file, if it starts with one."""
        for line in split_lines(self._read(0, _TAIL_WINDOW)):
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if line.endswith(b"\n") and isinstance(rec, dict) and type(rec.get("seq")) is int:
                    return rec["seq"], line_hash(line)
        return None

    def _follow(self, *, reopen: bool = False) -> None:
        """Leave our file when ``path`` no longer names it (see the module text); on SIGHUP
        (``reopen``) a file that is not a regular one (a FIFO) is closed and opened again."""
        sink = self._sink
        if sink.fd is None:
            return
        if not sink.regular:
            if reopen:
                self._close_fd()
            return
        try:
            st = os.stat(self.path)
            moved = (st.st_dev, st.st_ino) != sink.ident
        except FileNotFoundError:
            moved = True
        except OSError:
            return  # cannot look: the next write tells
        if not moved:
            return
        try:
            links = os.fstat(sink.fd).st_nlink
        except OSError:
            links = 1
        if links == 0:
            log.critical(
                "signerd.audit_deleted path=%s head_seq=%d first_seq=%s detail=%s",
                self.path,
                sink.seq,
                sink.first[0] if sink.first else "-",
                "the live audit file was deleted while signerd ran (not renamed: no name is "
                "left for it); its records are gone unless a copy exists; the chain continues "
                "in a new file",
            )
            self._anchor("deleted")
        else:
            self._anchor("rotated")  # the old file's last head, before leaving it
        self._close_fd()

    def _tick(self) -> None:
        """On the anchor schedule: notice a live file that shrank or went and an anchor file
        that went; anchor a head that moved."""
        sink = self._sink
        if sink.fd is not None and sink.regular:
            try:
                size = os.fstat(sink.fd).st_size
            except OSError:
                size = sink.good_end
            if size < sink.good_end:
                self._shrank(size)
                return
            self._follow()
        self._anchor("schedule")

    def _shrank(self, size: int) -> None:
        """The live file lost bytes under us: a security event, never a silent rotation."""
        sink = self._sink
        log.critical(
            "signerd.audit_truncated path=%s size=%d expected=%d head_seq=%d first_seq=%s "
            "detail=%s",
            self.path,
            size,
            sink.good_end,
            sink.seq,
            sink.first[0] if sink.first else "-",
            "the live audit file shrank (copytruncate or tampering); records may be lost",
        )
        self._anchor("truncated")
        sink.good_end, sink.rotated_from, sink.first = 0, sink.prev, None

    def _head(self) -> Head:
        sink = self._sink
        return Head(sink.seq, sink.prev, sink.first, sink.ident)

    def _anchor(self, kind: str) -> None:
        if self._anchors is not None:
            self._anchors.anchor(kind, self._head())

    def _close_fd(self) -> None:
        fd, self._sink.fd = self._sink.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def _to_journal(self, lines: list[bytes]) -> None:
        assert self._journal is not None
        try:
            for line in lines:
                self._journal(**journal_fields(line))
        except Exception as exc:  # the file is the record of truth; say so once
            if not self._journal_failing:
                log.warning("signerd.audit_journal_failed error=%s", exc)
            self._journal_failing = True
        else:
            self._journal_failing = False
