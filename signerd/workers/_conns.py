"""Open connections per uid, counted across every worker.

A table in an anonymous shared mapping that the supervisor creates before
forking, under one process-shared robust mutex (the same kind as
``SharedBuckets``'): checking a uid's total and counting the new connection
happen in one step, so two workers admitting at the same instant never let a
uid past its cap together. A slot is a uid (8 bytes, -1: free) and one 4-byte
count per worker slot; a uid's total is the sum of its row. A worker starting
in a slot clears that slot's column first: the connections of a worker that
died (killed, so it never counted them down) are gone with it and must not
keep counting against their uid.

Uids are placed by open addressing; a slot whose counts are all zero is
reused, so a stream of distinct uids does not fill the table. When every slot
holds a uid with open connections, a new uid is admitted uncounted (the
per-process caps still hold).

Each worker's whole count is kept too, one 4-byte total per worker slot after
the mutex (written under it, read without it: aligned stores are whole; -1
while the slot's worker does not accept yet), so that new connections can be
spread over the workers (``ahead``).
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from ._shm import MUTEX_BYTES, acquire, init_mutexes, release

__all__ = ["SharedConnections"]

_UID = struct.Struct("=q")
_FREE = -1
_COUNT = struct.Struct("=i")  # one count: a uid's in one worker, or a worker's total
#: a worker this many connections past the least loaded one lets that one accept first
SPREAD_SLACK = 2


class SharedConnections:
    """``admit(uid, cap) -> bool`` and ``release(uid)`` for one worker slot, shared by all."""

    def __init__(self, workers: int, slots: int = 1024) -> None:
        if workers < 1 or slots < 1:
            raise ValueError("workers and slots: at least 1")
        self.workers = workers
        self.slots = slots
        self.worker = 0  # the slot of the process using it (set by ``bind`` in a worker)
        self._row = _UID.size + 4 * workers
        self._rows = MUTEX_BYTES + 8 * ((4 * workers + 7) // 8)  # after the totals, aligned
        self._map = mmap.mmap(-1, self._rows + slots * self._row)
        self._view = (ctypes.c_char * len(self._map)).from_buffer(self._map)
        self._base = ctypes.addressof(self._view)
        self._counts = struct.Struct(f"={workers}i")  # a uid's row, or the workers' totals
        init_mutexes(self._base, 1)
        self._counts.pack_into(self._map, MUTEX_BYTES, *([-1] * workers))
        for s in range(slots):
            _UID.pack_into(self._map, self._rows + s * self._row, _FREE)

    def bind(self, worker: int) -> None:
        """This process is worker ``worker``: forget whatever that slot counted before; it
        accepts nothing until ``serving``."""
        if not 0 <= worker < self.workers:
            raise ValueError("worker: out of range")
        self.worker = worker
        at = self._rows + _UID.size + 4 * worker
        mutex = acquire(self._base)
        try:
            _COUNT.pack_into(self._map, MUTEX_BYTES + 4 * worker, -1)
            for s in range(self.slots):
                _COUNT.pack_into(self._map, at + s * self._row, 0)
        finally:
            release(mutex)

    def admit(self, uid: int, cap: int) -> bool:
        """Count one more connection of ``uid`` here, unless its total is at ``cap`` already."""
        mutex = acquire(self._base)
        try:
            at = self._find(uid, insert=True)
            if at >= 0:  # else the table is full of live uids: the per-process cap decides
                counts = self._counts.unpack_from(self._map, at + _UID.size)
                if sum(counts) >= cap:
                    return False
                mine = at + _UID.size + 4 * self.worker
                _COUNT.pack_into(self._map, mine, counts[self.worker] + 1)
            self._add_total(1)
            return True
        finally:
            release(mutex)

    def release(self, uid: int) -> None:
        """One connection of ``uid`` here closed."""
        mutex = acquire(self._base)
        try:
            at = self._find(uid, insert=False)
            if at >= 0:
                mine = at + _UID.size + 4 * self.worker
                (count,) = _COUNT.unpack_from(self._map, mine)
                _COUNT.pack_into(self._map, mine, max(0, count - 1))
            self._add_total(-1)
        finally:
            release(mutex)

    def serving(self, accepting: bool = True) -> None:
        """This worker accepts connections from now (its total counts from 0), or no more
        (closing: left out of the spread, as a worker that has not started)."""
        at = MUTEX_BYTES + 4 * self.worker
        mutex = acquire(self._base)
        try:
            (total,) = _COUNT.unpack_from(self._map, at)
            if not accepting or total < 0:
                _COUNT.pack_into(self._map, at, 0 if accepting else -1)
        finally:
            release(mutex)

    def _add_total(self, step: int) -> None:
        """This worker's whole count, one more or one less (hold the mutex); none while it
        is left out."""
        at = MUTEX_BYTES + 4 * self.worker
        (total,) = _COUNT.unpack_from(self._map, at)
        if total >= 0:
            _COUNT.pack_into(self._map, at, max(0, total + step))

    def totals(self) -> tuple[int, ...]:
        """Each worker slot's open connections (read without the mutex)."""
        return self._counts.unpack_from(self._map, MUTEX_BYTES)

    def ahead(self) -> bool:
        """Whether this worker holds ``SPREAD_SLACK`` or more connections than another one:
        it then lets that one accept the next connection first (``Listener``)."""
        totals = self.totals()
        least = min(t for t in totals if t >= 0) if max(totals) >= 0 else 0
        return totals[self.worker] >= least + SPREAD_SLACK

    def total(self, uid: int) -> int:
        """The open connections of ``uid`` over every worker (for tests and debugging)."""
        mutex = acquire(self._base)
        try:
            at = self._find(uid, insert=False)
            return 0 if at < 0 else sum(self._counts.unpack_from(self._map, at + _UID.size))
        finally:
            release(mutex)

    def _find(self, uid: int, *, insert: bool) -> int:
        """The offset of ``uid``'s row (made when ``insert``), or -1."""
        m = self._map
        start = uid % self.slots
        reuse = -1
        for i in range(self.slots):
            at = self._rows + ((start + i) % self.slots) * self._row
            (held,) = _UID.unpack_from(m, at)
            if held == uid:
                return at
            if held == _FREE:
                if reuse < 0:
                    reuse = at
                break
            if reuse < 0 and not any(self._counts.unpack_from(m, at + _UID.size)):
                reuse = at
        if not insert or reuse < 0:
            return -1
        _UID.pack_into(m, reuse, uid)
        self._counts.pack_into(m, reuse + _UID.size, *([0] * self.workers))
        return reuse
