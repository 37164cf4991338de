"""Which process serves each worker slot, since when, and how often the slot was started.

An anonymous shared mapping, made by the supervisor before it forks (or by a
single process for itself): each worker writes its own slot when it starts
(pid, wall-clock start, one more start), and any worker reads them all for
``GET /v1/status``. One writer per slot (a slot's next worker starts only
after the last one ended), aligned 8-byte fields: no lock is needed.
"""

from __future__ import annotations

import mmap
import struct
import time
from dataclasses import dataclass

__all__ = ["WorkerSlot", "WorkerTable"]

_HEAD = struct.Struct("=d")  # when the daemon started (unix seconds)
_SLOT = struct.Struct("=qdq")  # pid, when it started (unix seconds), starts of this slot
_SLOT_BYTES = 32


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    pid: int
    started: float  # unix seconds
    restarts: int  # starts of this slot after its first


class WorkerTable:
    def __init__(self, workers: int, started: float | None = None) -> None:
        self.workers = workers
        self._map = mmap.mmap(-1, _HEAD.size + _SLOT_BYTES * workers)
        _HEAD.pack_into(self._map, 0, time.time() if started is None else started)

    @property
    def started(self) -> float:
        """When the daemon (the supervisor, or the single process) started, unix seconds."""
        return float(_HEAD.unpack_from(self._map, 0)[0])

    def serving(self, index: int, pid: int) -> None:
        """Worker ``index`` (process ``pid``) has started."""
        at = _HEAD.size + _SLOT_BYTES * index
        _, _, starts = _SLOT.unpack_from(self._map, at)
        _SLOT.pack_into(self._map, at, pid, time.time(), starts + 1)

    def slots(self) -> list[WorkerSlot]:
        """The slots that have had a worker, by index."""
        found = []
        for index in range(self.workers):
            pid, started, starts = _SLOT.unpack_from(self._map, _HEAD.size + _SLOT_BYTES * index)
            if starts:
                found.append(WorkerSlot(index, int(pid), float(started), int(starts) - 1))
        return found
