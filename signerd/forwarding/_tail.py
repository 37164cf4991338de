"""Reading one chain's trail files as the audit trail writes them, from a saved position.

The trail is the buffer: nothing is copied. A ``ChainTail`` reads whole records
(lines ending in a newline) after the acknowledged offset, and moves to the file
the trail's path names only once the old one is read to its end, every record of
it acknowledged, and the new one has a record (the writer never writes to a file
renamed away once it wrote to the new one). After a restart it finds the file it
was reading by its identity (device, inode) among the files beside the path (a
rotated ``audit.w0.jsonl.1``); when that file is gone, the records it still held
are lost to the collector: logged at CRITICAL as ``signerd.forwarding_gap``.

Lines that are not records (bytes a failed write left) are skipped; records at or
below the acknowledged seq are never sent again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass

from ..audit import GENESIS
from ._state import Position

__all__ = ["ChainTail", "Item"]

log = logging.getLogger("signerd.forwarding")

MAX_LINE = 1 << 20  # a longer line is not a record of signerd's: skipped
_CHUNK = MAX_LINE  # read at most this much at once (a whole line fits)


@dataclass(frozen=True)
class Item:
    """One record read from the trail, not yet acknowledged."""

    chain: str
    line: bytes  # without its newline
    seq: int
    head: str  # the record's own hash
    record_id: str
    end: int  # offset after its line
    security: bool
    status: int


class ChainTail:
    """The records of one chain after its acknowledged position (see the module text)."""

    def __init__(self, chain: str, path: str, position: Position | None) -> None:
        self.chain, self.path = chain, path
        self.pos = position or Position()
        self.fd: int | None = None
        self.read_to = 0  # offset up to which records were handed out
        self.skipped = 0  # lines that were not records
        self._resume(position)

    # --- opening ---

    def _resume(self, position: Position | None) -> None:
        if position is None or position.ino == 0:
            self._open(self.path, 0)
            return
        want = (position.dev, position.ino)
        for candidate in self._siblings():
            with contextlib.suppress(OSError):
                st = os.stat(candidate)
                if (st.st_dev, st.st_ino) == want and st.st_size >= position.offset:
                    self._open(candidate, position.offset)
                    return
        log.critical(
            "signerd.forwarding_gap chain=%s after_seq=%d path=%s detail=%s",
            self.chain,
            position.seq,
            self.path,
            "the trail file being forwarded is gone (or shorter) and was not found beside it: "
            "the records after after_seq in it that were not forwarded are lost to the collector",
        )
        self._open(self.path, 0)

    def _siblings(self) -> list[str]:
        directory = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return [self.path]
        return [self.path] + [os.path.join(directory, n) for n in names if n.startswith(base)]

    def _open(self, path: str, offset: int) -> None:
        self.close()
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return  # not written yet
        st = os.fstat(fd)
        self.fd = fd
        if (st.st_dev, st.st_ino) != (self.pos.dev, self.pos.ino):
            self.pos.dev, self.pos.ino, self.pos.offset = st.st_dev, st.st_ino, offset
            self.pos.first_seq, self.pos.first_hash = 0, GENESIS
        self.read_to = self.pos.offset
        if self.pos.first_seq == 0:
            self._find_first()

    def _find_first(self) -> None:
        """The seq and hash of the open file's first record, if it has one yet."""
        if self.fd is None:
            return
        data = os.pread(self.fd, MAX_LINE, 0)
        end = data.find(b"\n")
        if end < 0:
            return
        parsed = _record(data[:end])
        if parsed is not None:
            self.pos.first_seq, self.pos.first_hash = parsed[0], line_hash(data[:end])

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- following the path ---

    def follow(self) -> None:
        """Move to the file the path names when the open one is done (see the module text)."""
        if self.fd is None:
            self._open(self.path, 0)
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.pos.dev, self.pos.ino) or st.st_size == 0:
            return
        size = os.fstat(self.fd).st_size
        if self.read_to == self.pos.offset == size or self._only_junk_left(size):
            log.info("signerd.forwarding_next_file chain=%s after_seq=%d", self.chain, self.pos.seq)
            self._open(self.path, 0)

    def _only_junk_left(self, size: int) -> bool:
        """Whether what is left unread in the old file has no complete record (a torn write)."""
        if self.read_to != self.pos.offset or self.fd is None:
            return False
        rest = os.pread(self.fd, min(size - self.pos.offset, MAX_LINE), self.pos.offset)
        return not any(_record(line) for line in rest.split(b"\n")[:-1]) and b"\n" not in rest[-1:]

    # --- reading ---

    def read(self, max_items: int, max_bytes: int) -> list[Item]:
        """The next records after ``read_to`` (complete lines only), at most so many."""
        items: list[Item] = []
        if self.fd is None:
            return items
        if self.pos.first_seq == 0:
            self._find_first()
        used = 0
        last_seq = self.pos.seq
        while len(items) < max_items and used < max_bytes:
            data = os.pread(self.fd, _CHUNK, self.read_to)
            cut = data.rfind(b"\n")
            if cut < 0:
                if len(data) >= _CHUNK:  # no newline in a whole chunk: not signerd's line
                    self.skipped += 1
                    self.read_to += len(data)
                    self.pos.offset = self.read_to if not items else self.pos.offset
                    continue
                break
            start = self.read_to
            for line in data[: cut + 1].split(b"\n")[:-1]:
                end = start + len(line) + 1
                start = end
                parsed = _record(line)
                if parsed is None:
                    self.skipped += 1
                elif parsed[0] > last_seq or (parsed[0] == 1 and parsed[1] == GENESIS):
                    last_seq = parsed[0]
                    items.append(
                        Item(
                            self.chain,
                            line,
                            parsed[0],
                            line_hash(line),
                            parsed[2],
                            end,
                            *parsed[3:],
                        )
                    )
                    used += len(line)
                if not items:  # nothing to send before it: skipped lines are acknowledged
                    self.pos.offset = end
                self.read_to = end
                if len(items) >= max_items or used >= max_bytes:
                    break
        return items

    def rewind(self) -> None:
        """The collector did not acknowledge what was read: read it again."""
        self.read_to = self.pos.offset

    def commit(self, item: Item) -> None:
        """The collector acknowledged ``item`` (in order)."""
        p = self.pos
        p.offset, p.seq, p.head, p.record_id = item.end, item.seq, item.head, item.record_id
        p.count += 1

    def lag_bytes(self) -> int:
        """Bytes of the trail not yet acknowledged (the open file's rest, and a newer file)."""
        if self.fd is None:
            with contextlib.suppress(OSError):
                return os.stat(self.path).st_size
            return 0
        lag = max(0, os.fstat(self.fd).st_size - self.pos.offset)
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != (self.pos.dev, self.pos.ino):
                lag += st.st_size
        return lag


def line_hash(line: bytes) -> str:
    """A record's own hash: SHA-256 of its line without the newline (as the chain has it)."""
    return hashlib.sha256(line).hexdigest()


def _record(line: bytes) -> tuple[int, str, str, bool, int] | None:
    """A trail record's seq, prev, record id, whether it is a security event and its
    status; None for a line that is not one."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or type(rec.get("seq")) is not int or rec["seq"] < 1:
        return None
    rid, prev, status = rec.get("record_id"), rec.get("prev"), rec.get("status")
    return (
        rec["seq"],
        prev if isinstance(prev, str) else "",
        rid if isinstance(rid, str) and len(rid) <= 128 else "",
        rec.get("security") is True,
        status if type(status) is int else 0,
    )
