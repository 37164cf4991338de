"""The listening socket: accepting, connection caps, descriptors.

``Listener`` accepts on the listening socket itself (``loop.add_reader``), so
it decides what happens when the process runs out of descriptors: one
reserved descriptor lets it accept and close the waiting connection, and the
failure is logged at most once per interval (never a traceback per accept).
Connections past the total cap or the per-uid cap (the uid from
``SO_PEERCRED``) are closed at once and counted. Each accepted connection is
a ``_protocol.Connection``; one sweeper, five times a second, cuts those
whose head, body or keep-alive deadline has passed. The socket is used as it was bound: its
``listen(SOMAXCONN)`` backlog is never set again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ._protocol import Connection, Limits, Throttled
from ._request import Request, Response
from .errors import SignerdError

__all__ = ["Listener", "connection_cap", "raise_nofile_limit"]

log = logging.getLogger("signerd.server")

_UCRED = struct.Struct("3i")
_ACCEPT_BATCH = 64  # connections accepted per wakeup of the listener
_SWEEP = 0.2  # seconds between checks of the connections' deadlines
_FD_HEADROOM = 128  # descriptors kept for the token, the audit file, executors
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Dispatch = Callable[[Request], Awaitable[Response]]
Precheck = Callable[[Request], SignerdError | None]


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            log.warning("signerd.nofile_not_raised soft=%d hard=%d", soft, hard)
    return soft


def connection_cap(configured: int, nofile: int) -> int:
    """The total connection cap: as configured, but leaving descriptor headroom."""
    return max(1, min(configured, nofile - _FD_HEADROOM))


class UidCounter(Protocol):
    """Connections per uid counted across processes (the workers' ``SharedConnections``)."""

    def admit(self, uid: int, cap: int) -> bool: ...

    def release(self, uid: int) -> None: ...


class Listener:
    """Accepts connections on a listening socket and owns the live ones."""

    def __init__(
        self,
        sock: socket.socket,
        dispatch: Dispatch,
        precheck: Precheck,
        limits: Limits,
    ) -> None:
        self.sock = sock
        self.dispatch, self.precheck, self.limits = dispatch, precheck, limits
        self.connections: set[Connection] = set()
        self.per_uid: dict[int, int] = {}
        self.shared_uids: UidCounter | None = None  # the per-uid cap across worker processes
        iv = limits.log_interval
        self.refused_total = Throttled("signerd.connection_refused reason=total_cap", iv)
        self.refused_uid = Throttled("signerd.connection_refused reason=uid_cap", iv)
        self.accept_failed = Throttled("signerd.accept_failed", iv, logging.ERROR)
        self.bad_http = Throttled("signerd.bad_http", iv)
        self.timed_out = Throttled("signerd.connection_timeout", iv, logging.INFO)
        self._loop = asyncio.get_running_loop()
        self._reserve: int | None = _open_reserve()
        self._accepting = False
        self._sweeper: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._accepting = True
        if self._sweeper is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Cut every connection whose deadline has passed (head, body, keep-alive)."""
        now = self._loop.time()
        for conn in list(self.connections):
            deadline = conn.deadline
            if deadline is not None and now >= deadline:
                conn.expired()
        self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def stop_accepting(self) -> None:
        if self._accepting:
            self._loop.remove_reader(self.sock.fileno())
            self._accepting = False

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let requests in progress finish (up to ``grace``), close the rest."""
        self.stop_accepting()
        deadline = time.monotonic() + grace
        for conn in list(self.connections):
            conn.close_when_idle()
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    def last_answers(self, exc: SignerdError) -> int:
        """``exc`` to every request in progress, from a thread other than the loop's, which
        is stuck in a call (``StallGuard``); how many were answered."""
        try:
            connections = list(self.connections)
        except RuntimeError:  # changed under us: the loop's thread was not stuck after all
            return 0
        return sum(conn.last_answer(exc) for conn in connections)

    # --- accepting ---

    def _on_readable(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRNOS:
                    self._out_of_descriptors(exc.errno)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self.accept_failed.note(errno=exc.errno)
                return
            self._admit(conn)

    def _out_of_descriptors(self, code: int | None) -> None:
        """Shed the waiting connection with the reserved descriptor; never spin, never flood."""
        self.accept_failed.note(errno=errno.errorcode.get(code or 0, code))
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
            with contextlib.suppress(OSError):
                conn, _ = self.sock.accept()
                conn.close()
            self._reserve = _open_reserve()
        if self._reserve is None and self._accepting:
            # not even one descriptor: listen again shortly instead of spinning
            self.stop_accepting()
            self._loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._reserve is None:
            self._reserve = _open_reserve()
        if not self._accepting and self.sock.fileno() != -1:
            self.start()

    def _admit(self, conn: socket.socket) -> None:
        try:
            _, uid, _ = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            conn.close()
            return
        if len(self.connections) >= self.limits.max_connections:
            conn.close()
            self.refused_total.note(uid=uid)
            return
        cap = self.limits.max_connections_per_uid
        if self.per_uid.get(uid, 0) >= cap or (
            self.shared_uids is not None and not self.shared_uids.admit(uid, cap)
        ):
            conn.close()
            self.refused_uid.note(uid=uid)
            return
        conn.setblocking(False)
        proto = Connection(self, uid)
        self.connections.add(proto)
        self.per_uid[uid] = self.per_uid.get(uid, 0) + 1
        task = self._loop.create_task(self._attach(conn, proto))
        proto.pending = task

    async def _attach(self, conn: socket.socket, proto: Connection) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: proto, conn)
        except OSError:
            conn.close()
            self.forget(proto)

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            if self.shared_uids is not None:
                self.shared_uids.release(conn.uid)
            left = self.per_uid.get(conn.uid, 1) - 1
            if left > 0:
                self.per_uid[conn.uid] = left
            else:
                self.per_uid.pop(conn.uid, None)


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
