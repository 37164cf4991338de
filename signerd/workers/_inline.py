"""Token calls on the workers' event loops, as every worker can see them.

A worker signs on its loop's thread (``StallGuard``); a token that hangs stalls
that loop until the guard ends the worker. When the token hangs, it hangs for
every worker: a second worker that signs on its loop too is lost as well, and
with it the verifications and readiness answers it could still give from its
cache. So each worker publishes, in a mapping the supervisor shares before
forking, when its loop's token call began (0: none), and the daemon publishes
that the token hung (a guard fired) until a token call answers again. Before
signing on its loop, a worker asks ``clear()``: while another worker's loop is
in the token (longer than ``SUSPECT_SECONDS``, 0: at all) or a guard fired, it
signs in its backend's executor instead, under the backend timeout, its loop
free. One loop at a time in the token: a hang that begins under load takes the
loop of the worker inside at that moment, not every worker's loop after it
(their replacements cannot start until the token answers).

Each slot is one aligned 8-byte double written by one process only (stores and
loads of it are whole); the times are ``time.monotonic()``, one clock for the
whole machine. A worker starting in a slot clears it: the call of a worker that
died there is over.
"""

from __future__ import annotations

import mmap
import struct
import time

__all__ = ["SUSPECT_SECONDS", "SharedInline"]

SUSPECT_SECONDS = 0.0  # another loop in the token this long keeps this one out (0: at all)
_SLOT = struct.Struct("=d")


class SharedInline:
    """One slot per worker (its loop's token call began at), and the token-hung mark."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers: at least 1")
        self.workers = workers
        self.worker = 0  # this process's slot (``bind``)
        self._map = mmap.mmap(-1, _SLOT.size * (workers + 1))  # slot ``workers``: the mark

    def bind(self, worker: int) -> None:
        """This process is worker ``worker``: its slot is cleared."""
        if not 0 <= worker < self.workers:
            raise ValueError("worker: out of range")
        self.worker = worker
        _SLOT.pack_into(self._map, _SLOT.size * worker, 0.0)

    def begin(self) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * self.worker, time.monotonic())

    def end(self) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * self.worker, 0.0)

    def hung(self) -> None:
        """A worker's guard fired on a token call: no worker signs on its loop until
        ``answered``."""
        _SLOT.pack_into(self._map, _SLOT.size * self.workers, time.monotonic())

    def answered(self) -> None:
        """A token call answered: the token is not hung (any more)."""
        if _SLOT.unpack_from(self._map, _SLOT.size * self.workers)[0]:
            _SLOT.pack_into(self._map, _SLOT.size * self.workers, 0.0)

    def clear(self) -> bool:
        """Whether this worker may sign on its loop: no guard fired since the last answer,
        and no other worker's loop is in the token (over ``SUSPECT_SECONDS``)."""
        values = struct.unpack_from(f"={self.workers + 1}d", self._map)
        if values[self.workers]:
            return False
        since = time.monotonic() - SUSPECT_SECONDS
        return not any(0.0 < v <= since for i, v in enumerate(values[:-1]) if i != self.worker)
