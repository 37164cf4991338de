"""The listening socket: accepting, connection caps, descriptors.

``Listener`` accepts on the listening socket itself (``loop.add_reader``), so
it decides what happens when the process runs out of descriptors: one
reserved descriptor lets it accept and close the waiting connection, and the
failure is logged at most once per interval (never a traceback per accept).
Each accepted connection is a ``_connection.Connection``; one sweeper, five
times a second, cuts those whose head, body or keep-alive deadline has
passed. The socket is used as it was bound: its ``listen(SOMAXCONN)``
backlog is never set again.

Caps, with the uid from ``SO_PEERCRED``: the total, per uid, and for
strangers (callers no policy rule names, ``_strangers``) a smaller cap per
uid, a share of the total, and as many new connections per second per uid
as that cap, so the rest stays free for named callers. A connection past a
cap is refused cheaply: one prepared 503 ``too_many_connections`` written
without waiting, then closed, counted in one log line per interval.

Refusing is the accept work a storm of reconnecting strangers causes (about
30-40 us of CPU each, mostly in the kernel), and it takes the loop's time
from named callers' requests: after each round of refusals the listener
rests ``_REST_FACTOR`` times the CPU time the round took, so refusals get at
most an eighth of the loop, and the rest of a storm waits in the kernel's
backlog (where a named caller's new connection waits its turn behind it).

Workers share the socket, and whichever wakes first would take every waiting
connection (32 opened at once could all land on one worker: measured, 3,850
against 4,900-5,200 signatures a second). A worker holding more connections than
the least loaded one (``UidCounter.ahead``) leaves the socket alone for
``_SPREAD_PAUSE`` for that one to accept; a connection still waiting then is
taken, one at a time: a busy or stuck worker delays one by the pause at most.
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
from collections.abc import Callable
from typing import Any, Protocol

from ..audit import AuditEvent
from ..authz._calls import Peer
from ..errors import SignerdError, TooManyConnections
from ._connection import Connection, Dispatch, Precheck
from ._limits import Limits, Throttled
from ._request import json_response

__all__ = ["Listener", "connection_cap", "raise_nofile_limit"]

#: audit records of the stall guard's last answers, at most (one write)
_MAX_STALL_RECORDS = 256

log = logging.getLogger("signerd.server")

_UCRED = struct.Struct("3i")
_ACCEPT_BATCH = 64  # connections accepted per wakeup of the listener
_REFUSAL_BATCH = 16  # ... or refused: then the listener rests
_REST_FACTOR = 7.0  # rest this many times the CPU time refusing took: refusals get <= 1/8
_MAX_BUCKETS = 4096  # stranger uids whose new connections are counted
_SWEEP = 0.2  # seconds between checks of the connections' deadlines
_SPREAD_PAUSE = 0.005  # s a worker ahead of another leaves a new connection to it
_FD_HEADROOM = 128  # descriptors kept for the token, the audit file, executors
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

_OVER_CAP = json_response(
    TooManyConnections().to_wire("-"),
    status=TooManyConnections.status,
    headers={"Retry-After": "1"},
).encode(keep_alive=False)
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


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
    """Connections counted across processes (the workers' ``SharedConnections``): per uid,
    and each worker's, to spread new connections over the workers."""

    def admit(self, uid: int, cap: int) -> bool: ...

    def release(self, uid: int) -> None: ...

    def serving(self, accepting: bool = True) -> None: ...  # or, closing, no more

    def ahead(self) -> bool: ...  # whether to leave the next one to a worker with fewer


class Classify(Protocol):
    """Whether a new connection is a stranger's (and its peer, when that took looking up)."""

    def classify(self, sock: socket.socket, uid: int, gid: int) -> tuple[bool, Peer | None]: ...


class Listener:
    """Accepts connections on a listening socket and owns the live ones."""

    def __init__(
        self,
        sock: socket.socket,
        dispatch: Dispatch,
        precheck: Precheck,
        limits: Limits,
        strangers: Classify | None = None,
        shared_uids: UidCounter | None = None,
    ) -> None:
        self.sock = sock
        # accept(2) alone: socket.accept() also builds a socket object, wasted on a refusal
        self._accept_fd: Callable[[], tuple[int, Any]] = sock._accept  # type: ignore[attr-defined]
        self._family = sock.family
        self.dispatch, self.precheck, self.limits = dispatch, precheck, limits
        self.strangers = strangers  # None: every caller is a named one
        self.connections: set[Connection] = set()
        self.per_uid: dict[int, int] = {}
        self.stranger_count = 0  # this process's connections of strangers
        self.answering = 0  # requests handed to the loop and not answered yet
        # what strangers may hold together; the rest of the total is kept for named callers
        self.strangers_share = min(limits.max_connections_strangers, limits.max_connections // 2)
        self.shared_uids = shared_uids  # the per-uid cap across worker processes
        iv = limits.log_interval
        self.refused_total = Throttled("signerd.connection_refused reason=total_cap", iv)
        self.refused_uid = Throttled("signerd.connection_refused reason=uid_cap", iv)
        self.refused_stranger = Throttled("signerd.connection_refused reason=stranger_cap", iv)
        self.refused_share = Throttled("signerd.connection_refused reason=strangers_share", iv)
        self.refused_stranger_rate = Throttled(
            "signerd.connection_refused reason=stranger_rate", iv
        )
        self._opens = _Opens()
        self.accept_failed = Throttled("signerd.accept_failed", iv, logging.ERROR)
        self.bad_http = Throttled("signerd.bad_http", iv)
        self.timed_out = Throttled("signerd.connection_timeout", iv, logging.INFO)
        self.refusing = 0.0  # CPU seconds spent in rounds of accepting with refusals
        self.paused = 0.0  # seconds rested after them (both for tests and debugging)
        self._loop = asyncio.get_running_loop()
        self._reserve: int | None = _open_reserve()
        self._accepting = False
        self._closed = False
        self._resume: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._left = False  # the waiting connection was left to a worker with fewer
        self.left_to_others = 0  # times that happened (for tests and debugging)

    def start(self) -> None:
        if self._closed or self._accepting:
            return
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._on_readable)
        self._accepting = True
        if self.shared_uids is not None and self._sweeper is None:  # the first start
            self.shared_uids.serving()
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
        self._closed = True
        self.stop_accepting()
        if self.shared_uids is not None:
            self.shared_uids.serving(False)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
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

    def last_answers(
        self, exc: SignerdError, record: Callable[[list[AuditEvent]], object] | None = None
    ) -> int:
        """``exc`` to every request in progress, from a thread other than the loop's, which
        is stuck in a call (``StallGuard``); how many were answered. ``record`` is given
        those answers' audit records first (at most ``_MAX_STALL_RECORDS``)."""
        try:
            connections = list(self.connections)
        except RuntimeError:  # changed under us: the loop's thread was not stuck after all
            return 0
        if record is not None:
            events = [e for c in connections if (e := c.stall_record(exc)) is not None]
            if events:
                record(events[:_MAX_STALL_RECORDS])
        return sum(conn.last_answer(exc) for conn in connections)

    # --- accepting ---

    def _on_readable(self) -> None:
        shared, batch = self.shared_uids, _ACCEPT_BATCH
        if shared is not None and shared.ahead():
            if not self._left:  # another worker holds fewer: it takes this one first
                self._left = True
                self.left_to_others += 1
                self._pause(_SPREAD_PAUSE)
                return
            batch = 1  # still waiting after the pause: take it, then look again
        self._left = False
        started = time.thread_time()
        accepted = refused = 0
        while accepted < batch and refused < _REFUSAL_BATCH:
            if accepted and shared is not None and shared.ahead():
                break  # the rest are for the others first
            try:
                fd, _ = self._accept_fd()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRNOS:
                    self._out_of_descriptors(exc.errno)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                self.accept_failed.note(errno=exc.errno)
                return
            accepted += 1
            refused += not self._admit(fd)
        if refused:
            # refusing takes the loop's time from named callers: rest after it, so that
            # refusals get at most 1 / (1 + _REST_FACTOR) of it
            spent = time.thread_time() - started  # CPU time: not the time others ran meanwhile
            self.refusing += spent
            self._rest(spent * refused / accepted * _REST_FACTOR)

    def _rest(self, seconds: float) -> None:
        self.paused += seconds if self._pause(seconds) else 0.0

    def _pause(self, seconds: float) -> bool:
        """Leave the listening socket alone for ``seconds`` (False: it is not listened to)."""
        if not self._accepting or self._closed:
            return False
        self.stop_accepting()
        self._resume = self._loop.call_later(seconds, self._resume_accepting)
        return True

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
            self._resume = self._loop.call_later(0.1, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._reserve is None:
            self._reserve = _open_reserve()
        if not self._closed and self.sock.fileno() != -1:
            self.start()

    def _admit(self, fd: int) -> bool:
        """Take the connection on ``fd``, or answer 503 and close it; whether it was taken."""
        conn = socket.socket(self._family, socket.SOCK_STREAM, 0, fd)
        try:
            _, uid, gid = _UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            conn.close()
            return True  # gone already: nothing to refuse
        limits = self.limits
        stranger = False
        peer: Peer | None = None
        if self.strangers is not None:
            stranger, peer = self.strangers.classify(conn, uid, gid)
        count = self.per_uid.get(uid, 0)
        if len(self.connections) >= limits.max_connections:
            return _refuse(conn, self.refused_total, uid)
        if stranger:
            cap = limits.max_connections_stranger
            if count >= cap:
                return _refuse(conn, self.refused_stranger, uid)
            if self.stranger_count >= self.strangers_share:
                return _refuse(conn, self.refused_share, uid)
            if not self._opens.take(uid, cap):
                return _refuse(conn, self.refused_stranger_rate, uid)
        else:
            cap = limits.max_connections_per_uid
            if count >= cap:
                return _refuse(conn, self.refused_uid, uid)
        shared = self.shared_uids
        if shared is not None and not shared.admit(uid, cap):
            return _refuse(conn, self.refused_stranger if stranger else self.refused_uid, uid)
        conn.setblocking(False)
        proto = Connection(self, self._loop, uid)
        proto.stranger = stranger
        proto.peer = peer
        proto.sock = conn  # until its transport is attached (``Connection.last_answer``)
        self.connections.add(proto)
        self.per_uid[uid] = count + 1
        self.stranger_count += stranger
        proto.pending = self._loop.create_task(self._attach(conn, proto))
        return True

    async def _attach(self, conn: socket.socket, proto: Connection) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: proto, conn)
        except OSError:
            conn.close()
            self.forget(proto)

    def forget(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stranger_count -= conn.stranger
            if self.shared_uids is not None:
                self.shared_uids.release(conn.uid)
            left = self.per_uid.get(conn.uid, 1) - 1
            if left > 0:
                self.per_uid[conn.uid] = left
            else:
                self.per_uid.pop(conn.uid, None)


class _Opens:
    """New connections per second of each stranger uid (this process): a token bucket of
    ``cap`` tokens refilled at ``cap`` per second, so a stranger that connects and closes in a
    loop is refused cheaply instead of being set up and torn down again and again."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}

    def take(self, uid: int, cap: int) -> bool:
        now = time.monotonic()
        tokens, stamp = self._buckets.get(uid, (float(cap), now))
        tokens = min(float(cap), tokens + (now - stamp) * cap)
        if tokens < 1.0:
            self._buckets[uid] = (tokens, now)
            return False
        if len(self._buckets) >= _MAX_BUCKETS and uid not in self._buckets:
            self._buckets.clear()  # a full bucket for everyone: what they would have had anyway
        self._buckets[uid] = (tokens - 1.0, now)
        return True


def _refuse(conn: socket.socket, counter: Throttled, uid: int) -> bool:
    """One prepared 503 (if the socket takes it at once), then close: no parsing, no waiting."""
    with contextlib.suppress(OSError):
        conn.send(_OVER_CAP, _SEND_FLAGS)
    conn.close()
    counter.note(uid=uid)
    return False


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
