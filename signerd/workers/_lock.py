"""``AdminLock``: one admin operation at a time across every worker.

An ``flock`` on a file in the runtime directory. Each process opens the file
itself (a descriptor inherited over ``fork`` would share one lock among all
the workers), the kernel drops the lock when its holder dies, and an
``asyncio.Lock`` in front orders the coroutines of one process, since flock
does not exclude a second taker through the same descriptor.

Taking it never blocks the event loop: it polls with ``LOCK_NB``, a few
milliseconds apart, until its timeout (admin operations are rare and short;
a poll is cancellable where a blocked executor thread is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator

__all__ = ["AdminLock", "LockTimeout", "runtime_path"]

_POLL_FIRST = 0.001
_POLL_MAX = 0.02


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
    """``async with lock.hold(timeout=5.0): ...`` serialises admin operations across processes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self._pid = -1
        self._local: asyncio.Lock | None = None
        self._local_loop: asyncio.AbstractEventLoop | None = None

    @contextlib.asynccontextmanager
    async def hold(self, timeout: float = 5.0) -> AsyncIterator[None]:
        """Hold the lock for the block; LockTimeout when it was not free within ``timeout``."""
        deadline = time.monotonic() + timeout
        local = self._local_lock()
        try:
            await asyncio.wait_for(local.acquire(), max(0.0, timeout))
        except TimeoutError:
            raise LockTimeout(f"admin lock busy for {timeout:g} s") from None
        try:
            await self._take(deadline, timeout)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            local.release()

    def close(self) -> None:
        if self._fd >= 0 and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = -1

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
        return self._fd

    async def _take(self, deadline: float, timeout: float) -> None:
        fd = self._descriptor()
        pause = _POLL_FIRST
        while True:
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
