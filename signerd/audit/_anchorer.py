"""Writing one chain's anchors, and watching the anchor file while signerd runs.

The format of an anchor, and reading anchor files, are ``_anchor``'s; the
trail (``_audit``, ``_trailfile``) calls the ``Anchorer`` with its head.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import time
from collections.abc import Callable
from typing import NamedTuple

from ._anchor import GENESIS, RUN, SECURITY_KINDS, Anchor, Lost, parse_anchor

__all__ = ["AnchorLog", "Anchorer", "Head"]

log = logging.getLogger("signerd.audit")

_LATEST_WINDOW = 256 << 10  # how far back start-up looks for the chain's last anchor


class AnchorLog:
    """The append-only anchor file: opened O_APPEND, each anchor one write and one fsync.

    It keeps the file it opened, and ``state`` says whether the path still names it,
    as long as this process left it: a file deleted, replaced or cut shorter under us is
    not followed silently (the ``Anchorer`` makes that a security event)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None
        self._end = 0  # the file's size after our last write (other writers only append)

    def open(self) -> bool:
        """Open the file, creating it when missing; whether it existed. OSError when it cannot."""
        if self._fd is not None:
            return True
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NONBLOCK
        existed = True
        try:
            self._fd = os.open(self.path, flags)
        except FileNotFoundError:
            existed = False
            self._fd = os.open(self.path, flags | os.O_CREAT, 0o640)
        st = os.fstat(self._fd)
        self._end = st.st_size if stat.S_ISREG(st.st_mode) else 0
        if self._torn():
            os.write(self._fd, b"\n")  # end a line torn by a crash: this one stays whole
            self._end += 1
        return existed

    def state(self) -> str:
        """``ok`` while the path names the file we hold, at least as long as we left it (or we
        hold none: ``closed``); else how it went: ``rotated`` (renamed: it still has a name),
        ``deleted`` (no name left), ``replaced`` (another file at the path and ours has no name
        left), ``truncated`` (ours, shorter than we left it)."""
        if self._fd is None:
            return "closed"
        try:
            mine = os.fstat(self._fd)
        except OSError:
            return "closed"
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError:
            return "ok"  # cannot look (a directory made unsearchable): the next append tells
        if st is None or (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino):
            if not stat.S_ISREG(mine.st_mode) or mine.st_nlink > 0:
                return "rotated"
            return "deleted" if st is None else "replaced"
        if stat.S_ISREG(mine.st_mode) and mine.st_size < self._end:
            return "truncated"
        return "ok"

    def append(self, anchor: Anchor) -> None:
        """Write one anchor durably; OSError when it cannot be (the caller logs it). The file
        stays open after a failed write (a full disk): the next anchor goes to the same file."""
        self.open()
        assert self._fd is not None
        data = anchor.line()
        if os.write(self._fd, data) != len(data):
            raise OSError(f"short write to {self.path}")
        st = os.fstat(self._fd)
        if stat.S_ISREG(st.st_mode):
            os.fsync(self._fd)
            self._end = st.st_size

    def _torn(self) -> bool:
        """Whether the file ends in a line without its newline (a crash mid-write)."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False
        with open(f"/proc/self/fd/{self._fd}", "rb") as handle:
            handle.seek(st.st_size - 1)
            return handle.read(1) != b"\n"

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class Head(NamedTuple):
    """The chain's head as the trail knows it: what an anchor names."""

    seq: int
    head: str
    first: tuple[int, str] | None  # the first record of the file the head is in
    ident: tuple[int, int] | None  # that file's device and inode


class Anchorer:
    """Writes one chain's anchors: to the anchor file, and to journald when that is on.

    It also watches the anchor file: one deleted, replaced or truncated while signerd
    runs (or missing at start while the trail has records) is logged at CRITICAL
    (``signerd.audit_anchor_lost``) and the file is started again with a ``recreated``
    anchor saying what was lost; signerd keeps signing (the trail itself is intact, and
    refusing would let anyone who can delete a file stop every tenant's signing), and
    verification fails until the lost anchors are given back. A file renamed away is a
    rotation: followed, and the head anchored again at the top of the new file.
    """

    def __init__(
        self,
        path: str,
        chain: str,
        boot: str,
        journal_send: Callable[..., object] | None,
        *,
        run: str = RUN,
        chains: tuple[str, ...] = (),
    ) -> None:
        self.path, self.chain, self.boot = path, chain, boot
        self.run, self.chains = run, chains or (chain,)
        self._log = AnchorLog(path)
        self._journal = journal_send
        self._failing = False
        self.anchored: tuple[int, str] | None = None  # the head the last anchor named
        self._known: Anchor | None = None  # the last anchor of this chain in the file we hold
        self._count = 0  # anchors of this chain known to be in it (at least)
        self._lost: Lost | None = None  # to be said by the next anchor (``recreated``)

    def start(self, records: bool) -> Anchor | None:
        """At start: open the anchor file and read this chain's latest anchor in it. A file
        missing while the trail has ``records`` is the start-up form of a lost anchor file."""
        last = self.latest()
        self._known, self._count = last, (1 if last is not None else 0)
        try:
            existed = self._log.open()
        except OSError as exc:
            self._fail(exc)
            return last
        if not existed and records:
            self._lose("missing", -1)
        return last

    def anchor(self, kind: str, head: Head) -> None:
        """Anchor the head unless it is anchored already (a security kind always); log a
        failure once per streak: anchors are checkpoints, a failing one refuses nothing."""
        self.check(head)
        if self._lost is not None:  # a lost anchor file is said first (a failed write: again)
            self._write("recreated", head)
            if kind not in SECURITY_KINDS:
                return
        elif head[:2] == self.anchored and kind not in SECURITY_KINDS:
            return
        self._write(kind, head)

    def check(self, head: Head) -> None:
        """Notice the anchor file leaving us (see the class text); on the anchor tick and
        before every anchor."""
        state = self._log.state()
        if state in ("ok", "closed"):
            return
        self._log.close()
        if state == "rotated":
            log.info("signerd.audit_anchor_rotated path=%s chain=%s", self.path, self.chain)
            self._known, self._count, self.anchored = None, 0, None
            self._write("schedule", head)  # every file names each chain of the run
            return
        self._lose(state, self._count)
        self._write("recreated", head)

    def _lose(self, reason: str, count: int) -> None:
        last = self._known if count else None
        what = (
            "missing at start while the trail holds records"
            if reason == "missing"
            else f"{reason} while signerd ran"
        )
        log.critical(
            "signerd.audit_anchor_lost path=%s chain=%s reason=%s anchors=%s last_seq=%s detail=%s",
            self.path,
            self.chain,
            reason,
            count if count >= 0 else "unknown",
            last.seq if last is not None else "-",
            f"the anchor file was {what}; a new one starts with a 'recreated' anchor, and "
            "verification fails until the lost anchors are given (the file, or an off-host "
            "copy of it)",
        )
        self._lost = Lost(reason, count, last)
        self._known, self._count, self.anchored = None, 0, None

    def behind(self, last: Anchor) -> None:
        """Anchor again, as ``truncated``, a head the trail file no longer holds (at start)."""
        self.check(Head(last.seq, last.head, (last.first_seq, last.first_hash), None))
        self._write("truncated", Head(last.seq, last.head, (last.first_seq, last.first_hash), None))

    def latest(self) -> Anchor | None:
        """This chain's newest anchor among the last lines of the anchor file, if any."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - _LATEST_WINDOW))
                lines = handle.read(_LATEST_WINDOW).splitlines()
        except OSError:
            return None
        mine = [
            a for line in lines if (a := parse_anchor(line)) is not None and a.chain == self.chain
        ]
        return max(mine, key=lambda a: a.seq, default=None)

    def _write(self, kind: str, head: Head) -> None:
        seq, digest, first, ident = head
        if first is None:
            if seq > 0:
                return  # the head's file is not known: nothing to name
            first = (0, GENESIS)
        anchor = Anchor(
            self.chain,
            kind,
            round(time.time(), 6),
            seq,
            digest,
            *first,
            self.boot,
            *(ident or (0, 0)),
            self.run,
            self.chains,
            self._lost if kind == "recreated" else None,
        )
        try:
            self._log.append(anchor)
        except OSError as exc:
            self._fail(exc)
            return
        if self._failing:
            log.warning("signerd.audit_anchor_recovered path=%s", self.path)
        self._failing, self.anchored = False, (seq, digest)
        self._known, self._count = anchor, self._count + 1
        if kind == "recreated":
            self._lost = None
        if self._journal is not None:
            with contextlib.suppress(Exception):  # the anchor file is what verify reads
                self._journal(**anchor.journal_fields())

    def _fail(self, exc: OSError) -> None:
        if not self._failing:
            log.error("signerd.audit_anchor_failed error=%s path=%s", exc, self.path)
        self._failing = True

    def close(self) -> None:
        self._log.close()
