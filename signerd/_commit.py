"""Group commit: records written by the thread that produced what they acknowledge.

The token thread signs a group, checks every signature, then writes the
group's records itself (``commit``: one write, one fsync, no hop to the
writer thread), or, when more groups wait for the token, hands them to the
trail's writer thread (``hand_off``) and signs the next group during the
fsync. Either way the records are durable before the signatures leave, the
file and the chain state have one writer at a time (``_io``), a stuck write
refuses new work at once (``stuck``), and records whose callers stopped
waiting (``give_up``) are listed in the next record's ``unacknowledged``.
``check`` is the signature check both paths run before any record is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TypeVar

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._calls import AuditEvent
from ._chain import GENESIS
from .errors import BackendError, SignerdError

log = logging.getLogger("signerd.keys")
_T = TypeVar("_T")


@dataclass(eq=False)
class Ticket:
    """A group of records written by ``commit`` in the caller's thread (sign + audit in one step)."""

    since: float | None = None  # monotonic time its write began; None while queued
    state: str = "queued"  # queued -> writing -> done; or queued -> abandoned
    abandoned: bool = False  # the callers gave up while the records were being written
    seqs: list[int] = field(default_factory=list)  # written records, when done


@dataclass(frozen=True, eq=False)
class _Handed:
    """A group of records handed to the writer thread; ``finish(written)`` when done."""

    prepare: Callable[[], list[AuditEvent]]  # the records, made in the writer thread
    ticket: Ticket
    finish: Callable[[bool], None]


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
    """The writers' view of the file; touched only by the holder of ``_io``."""

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


class GroupCommit:
    """The group-commit half of ``AuditTrail`` (which provides the state and the writes)."""

    write_timeout: float
    _cond: threading.Condition
    _io: threading.Lock
    _closed: bool
    _reopen: bool
    _busy_since: float | None
    _commit_since: float | None
    _late: list[int]
    _journal_q: deque[bytes]
    _groups: deque[_Handed]
    _journal: Callable[..., object] | None

    def _start(self) -> None:
        raise NotImplementedError

    def _anchor(self, kind: str) -> None:
        raise NotImplementedError

    def _close_fd(self) -> None:
        raise NotImplementedError

    def _guarded_write(self, events: list[AuditEvent]) -> tuple[list[bytes], list[int]]:
        raise NotImplementedError

    def _stuck(self, now: float) -> bool:
        """Whether a write has been under way longer than ``write_timeout`` (hold ``_cond``)."""
        busy = [t for t in (self._busy_since, self._commit_since) if t is not None]
        return bool(busy) and now - min(busy) > self.write_timeout

    def stuck(self) -> bool:
        """Whether a record asked for now would be refused at once (a write is stuck)."""
        with self._cond:
            return self._closed or self._stuck(time.monotonic())

    def commit(self, events: list[AuditEvent], ticket: Ticket) -> bool:
        """Write records durably in the calling thread; False when they cannot be (group commit).

        For a thread that has just produced the operations these records
        acknowledge (the token thread, after signing and checking a group): one
        write and one fsync for the group, no hop to the writer thread. The
        caller waits on ``ticket`` (``since``) for at most ``write_timeout`` and
        calls ``give_up`` when it stops waiting.
        """
        now = time.monotonic()
        with self._cond:
            if self._closed or ticket.state != "queued" or self._stuck(now):
                ticket.state = "done"
                return False
            ticket.state, ticket.since = "writing", now
            self._start()  # anchors on schedule and the journal stay with the writer thread
        lines: list[bytes] = []
        if self._io.acquire(timeout=self.write_timeout):
            try:
                with self._cond:
                    self._commit_since = time.monotonic()
                    reopen, self._reopen = self._reopen, False
                    go = not ticket.abandoned
                if reopen:
                    self._anchor("rotated")
                    self._close_fd()
                if go:
                    lines, ticket.seqs = self._guarded_write(events)
            finally:
                with self._cond:
                    self._commit_since = None
                self._io.release()
        with self._cond:
            ticket.state = "done"
            if lines and ticket.abandoned:
                self._late.extend(ticket.seqs)
            if lines and self._journal is not None:
                self._journal_q.extend(lines)
                self._cond.notify()
        return bool(lines)

    def hand_off(
        self,
        prepare: Callable[[], list[AuditEvent]],
        ticket: Ticket,
        finish: Callable[[bool], None],
    ) -> bool:
        """Like ``commit``, but the writer thread calls ``prepare()`` for the records (the
        signature checks run there), writes them with whatever else is queued, then calls
        ``finish(written)``; False when the group was not taken (call ``commit`` then)."""
        now = time.monotonic()
        with self._cond:
            if self._closed or ticket.state != "queued" or self._stuck(now):
                return False
            ticket.since = now  # the callers' audit deadline runs from here
            self._start()
            self._groups.append(_Handed(prepare, ticket, finish))
            self._cond.notify()
        return True

    def give_up(self, ticket: Ticket) -> None:
        """The callers of a commit stopped waiting: its records, if written, are unacknowledged."""
        with self._cond:
            if ticket.state == "queued":
                ticket.state = "abandoned"
            elif ticket.state == "writing":
                ticket.abandoned = True
            elif ticket.seqs and not ticket.abandoned:
                ticket.abandoned = True
                self._late.extend(ticket.seqs)


def check(
    public: Ed25519PublicKey,
    kid: str,
    datas: Sequence[bytes],
    results: Sequence[bytes | SignerdError],
) -> list[bytes | SignerdError]:
    """Each signature checked against the public key; one that fails is a BackendError."""
    checked: list[bytes | SignerdError] = []
    for data, result in zip(datas, results, strict=True):
        if isinstance(result, bytes):
            try:
                public.verify(result, data)
            except _CryptoInvalidSignature:
                log.error("signerd.signature_check_failed kid=%s", kid)
                result = BackendError("the backend produced a signature that does not verify")
        checked.append(result)
    return checked


def settle(done: Future[_T], outcome: _T | BaseException) -> None:
    """Resolve a future another thread waits on, unless it was given up meanwhile."""
    with contextlib.suppress(InvalidStateError):
        if isinstance(outcome, BaseException):
            done.set_exception(outcome)
        else:
            done.set_result(outcome)
