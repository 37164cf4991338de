"""Rate-limit token buckets shared by every worker.

A table in an anonymous shared mapping that the supervisor creates before
forking, so every worker reads and writes the same pages. The table has a
fixed number of slots in groups of 8; a key (rule, uid, unit) hashes to one
group and lives in one of its slots. A slot is 32 bytes: a 16-byte BLAKE2b
digest of the key, the tokens left and the time they were counted
(CLOCK_MONOTONIC, the same clock in every process), both doubles.

Each group has its own process-shared, *robust* pthread mutex in the mapping
(through ctypes; about 1 µs to take and give back): when a worker dies
holding one, the next taker gets EOWNERDEAD, marks the mutex consistent and
goes on, so a killed worker cannot wedge the others. The worst a death
mid-update leaves is one bucket refilled early. When a group is full, a new
key takes the slot idle the longest: that bucket would have refilled anyway
unless it was used within the last few moments.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import struct
from collections.abc import Hashable

from ._shm import MUTEX_BYTES, acquire, init_mutexes, release

__all__ = ["SharedBuckets"]

SLOT = 32
GROUP = 8
_GROUP_BYTES = SLOT * GROUP
_DIGEST = 16
_VALUES = struct.Struct("=dd")  # tokens, stamp
_EMPTY = bytes(_DIGEST)
_CACHE = 4096  # digests remembered per process


class SharedBuckets:
    """``take(key, rate, burst, now) -> bool``: one token from the shared bucket of ``key``."""

    def __init__(self, slots: int = 4096) -> None:
        if slots < GROUP:
            raise ValueError(f"slots: at least {GROUP}")
        self.groups = slots // GROUP
        self.slots = self.groups * GROUP
        self._table = self.groups * MUTEX_BYTES  # slots start after the mutexes
        self._map = mmap.mmap(-1, self._table + self.groups * _GROUP_BYTES)  # MAP_SHARED
        self._view = (ctypes.c_char * len(self._map)).from_buffer(self._map)
        self._base = ctypes.addressof(self._view)
        self._digests: dict[Hashable, tuple[bytes, int]] = {}
        init_mutexes(self._base, self.groups)

    def close(self) -> None:
        del self._view
        self._map.close()

    @staticmethod
    def digest(key: Hashable) -> bytes:
        """16 bytes naming ``key`` in every process (``hash()`` differs per interpreter)."""
        return hashlib.blake2b(repr(key).encode(), digest_size=_DIGEST).digest()

    def take(self, key: Hashable, rate: float, burst: float, now: float) -> bool:
        """Refill the bucket of ``key`` to ``now`` at ``rate``/s (at most ``burst``); take one token."""
        found = self._digests.get(key)
        if found is None:
            found = self._locate(key)
        digest, group = found
        start = self._table + group * _GROUP_BYTES
        m = self._map
        mutex = self._acquire(group)
        try:
            at = self._find(digest, start)
            cap = float(burst)
            if at < 0:
                at = self._free_slot(start)
                m[at : at + _DIGEST] = digest
                tokens = cap
            else:
                # ``now`` was read before the mutex: another process may have counted
                # to a later instant already, and the stamp must never go back
                tokens, stamp = _VALUES.unpack_from(m, at + _DIGEST)
                if now > stamp:
                    tokens = min(cap, tokens + (now - stamp) * rate)
                else:
                    tokens, now = min(cap, tokens), stamp
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            _VALUES.pack_into(m, at + _DIGEST, tokens, now)
            return allowed
        finally:
            release(mutex)

    def tokens(self, key: Hashable) -> float | None:
        """The tokens ``key`` had at its last take (None: no bucket); for tests and debugging."""
        digest, group = self._locate(key)
        at = self._find(digest, self._table + group * _GROUP_BYTES)
        return None if at < 0 else float(_VALUES.unpack_from(self._map, at + _DIGEST)[0])

    def _locate(self, key: Hashable) -> tuple[bytes, int]:
        digest = self.digest(key)
        found = (digest, int.from_bytes(digest[:8], "little") % self.groups)
        if len(self._digests) >= _CACHE:
            self._digests.clear()
        self._digests[key] = found
        return found

    def _acquire(self, group: int) -> int:
        return acquire(self._base + group * MUTEX_BYTES)

    def _find(self, digest: bytes, start: int) -> int:
        m = self._map
        at = m.find(digest, start, start + _GROUP_BYTES)
        while at >= 0 and (at - start) % SLOT:  # a match astride two fields: look on
            at = m.find(digest, at + 1, start + _GROUP_BYTES)
        return at

    def _free_slot(self, start: int) -> int:
        m = self._map
        oldest, oldest_stamp = start, float("inf")
        for at in range(start, start + _GROUP_BYTES, SLOT):
            if m[at : at + _DIGEST] == _EMPTY:
                return at
            stamp = _VALUES.unpack_from(m, at + _DIGEST)[1]
            if stamp < oldest_stamp:
                oldest, oldest_stamp = at, stamp
        return oldest
