"""``AdminLock``: one admin operation at a time across every worker.

An ``flock`` on a file in the runtime directory. Each process opens the file
itself (a descriptor inherited over ``fork`` would share one lock among all
the workers), the kernel drops the lock when its holder dies, and an
``asyncio.Lock`` in front orders the coroutines of one process, since flock
does not exclude a second taker through the same descriptor.

Taking it never blocks the event loop: it polls with ``LOCK_NB``, a few
milliseconds apart, until its timeout (admin operations are rare and short;
a poll is cancellable where a blocked executor thread is not).

Turns are fair between workers. A worker whose callers keep asking would
otherwise keep the lock: its next caller, queued already or sent by a client
the moment it had its answer, takes the free lock at once, while another
worker only looks every few milliseconds. So each worker publishes, in its
own slot of the lock file (mapped by all), how many of its callers wait and
how many turns it has had. A worker that releases the lock while another one
waits lets that one have a turn before it takes the lock again, or waits
``_YIELD_MAX`` at most (a waiter that died or stopped waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import struct
import time
from collections.abc import AsyncIterator

__all__ = ["AdminLock", "LockTimeout", "runtime_path"]

_POLL_FIRST = 0.001
_POLL_MAX = 0.02
_YIELD_MAX = 0.25  # the longest a worker gives way to another after its turn
_SLOT = struct.Struct("=QQ")  # per worker: callers waiting, turns taken


def runtime_path(socket_path: str, name: str) -> str:
    """``.signerd-NAME`` in the runtime directory: systemd's $RUNTIME_DIRECTORY (its first
    entry), else the directory of the socket, which signerd creates 0750 and owns."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return os.path.join(
        runtime or os.path.dirname(os.path.abspath(socket_path)), f".signerd-{name}"
    )


class LockTimeout(TimeoutError):
    """The admin lock was not free within the timeout."""


class AdminLock:
    """``async with lock.hold(timeout=5.0): ...`` serialises admin operations across processes.

    ``slot`` (of ``slots``) is this worker's place in the lock file for fair turns; the
    worker's own process makes it. Without them the lock is first come, first served."""

    def __init__(self, path: str, *, slot: int = 0, slots: int = 0) -> None:
        self.path = path
        self._slot, self._slots = (slot, slots) if 0 <= slot < slots else (0, 0)
        self._fd = -1
        self._pid = -1
        self._map: mmap.mmap | None = None
        self._waiting = 0
        self._turns = 0
        self._give_way: dict[int, int] = {}  # slot -> its turns when this worker released
        self._give_way_until = 0.0
        self._local: asyncio.Lock | None = None
        self._local_loop: asyncio.AbstractEventLoop | None = None
        if self._slots:  # clear this slot now: a replaced worker's waiters are gone
            with contextlib.suppress(OSError):  # reported when an operation needs the lock
                self._descriptor()

    @classmethod
    def of_worker(cls, socket_path: str, index: int, workers: int) -> AdminLock:
        """Worker ``index``'s lock, in the runtime directory (made in that worker's process)."""
        return cls(runtime_path(socket_path, "admin.lock"), slot=index, slots=workers)

    @contextlib.asynccontextmanager
    async def hold(self, timeout: float = 5.0) -> AsyncIterator[None]:
        """Hold the lock for the block; LockTimeout when it was not free within ``timeout``."""
        deadline = time.monotonic() + timeout
        local = self._local_lock()
        fd = self._descriptor()
        self._publish(waiting=+1)
        try:
            try:
                await asyncio.wait_for(local.acquire(), max(0.0, timeout))
            except TimeoutError:
                raise LockTimeout(f"admin lock busy for {timeout:g} s") from None
        except BaseException:
            self._publish(waiting=-1)
            raise
        try:
            try:
                await self._take(fd, deadline, timeout)
            finally:
                self._publish(waiting=-1)
            self._publish(turns=+1)
            try:
                yield
            finally:
                self._note_waiters()
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            local.release()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            if self._map is not None:
                self._map.close()
            os.close(self._fd)
        self._fd, self._map = -1, None

    def _local_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._local is None or self._local_loop is not loop:
            self._local, self._local_loop = asyncio.Lock(), loop
        return self._local

    def _descriptor(self) -> int:
        if self._fd < 0 or self._pid != os.getpid():  # first use, or first use after a fork
            flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
            self._fd = os.open(self.path, flags, 0o600)
            self._pid = os.getpid()
            self._map, self._waiting, self._turns, self._give_way = None, 0, 0, {}
            if self._slots:
                self._map = self._mapped(self._fd, self._slots * _SLOT.size)
                self._publish()
        return self._fd

    @staticmethod
    def _mapped(fd: int, size: int) -> mmap.mmap | None:
        """The slots, shared by every process that maps the file; None where it cannot be."""
        try:
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # only ever grows: a smaller file is never cut
            return mmap.mmap(fd, size)
        except (OSError, ValueError):
            return None

    def _publish(self, *, waiting: int = 0, turns: int = 0) -> None:
        self._waiting += waiting
        self._turns += turns
        if self._map is not None:
            _SLOT.pack_into(self._map, self._slot * _SLOT.size, self._waiting, self._turns)

    def _others(self) -> dict[int, tuple[int, int]]:
        """The other workers' (waiting, turns)."""
        if self._map is None:
            return {}
        return {
            i: _SLOT.unpack_from(self._map, i * _SLOT.size)
            for i in range(self._slots)
            if i != self._slot
        }

    def _note_waiters(self) -> None:
        """On release: the workers that wait now get a turn before this one's next, whether
        that caller waits already or comes a moment later (a client's next request)."""
        self._give_way = {i: t for i, (w, t) in self._others().items() if w}
        self._give_way_until = time.monotonic() + _YIELD_MAX

    def _giving_way(self) -> bool:
        if not self._give_way:
            return False
        now = self._others()
        self._give_way = {i: t for i, t in self._give_way.items() if now[i][0] and now[i][1] == t}
        if self._give_way and time.monotonic() < self._give_way_until:
            return True
        self._give_way = {}
        return False

    async def _take(self, fd: int, deadline: float, timeout: float) -> None:
        pause = _POLL_FIRST
        while True:
            if not self._giving_way():
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockTimeout(f"admin lock busy for {timeout:g} s")
            await asyncio.sleep(min(pause, left))
            pause = min(_POLL_MAX, pause * 2)
