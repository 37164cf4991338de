"""HTTP/1.1 on one connection: llhttp (``httptools``) in an ``asyncio.Protocol``.

This module knows connections, not routes (model: uvicorn's
``protocols/http/httptools_impl.py``). ``Connection`` parses with llhttp and
enforces, per connection: a deadline for the request head, a deadline for the
body, an idle keep-alive timeout, at most ``max_body_bytes`` of body held in
memory, reading paused while a request is being answered (and while the peer
does not read its answers). Malformed HTTP gets one 400 answer and the
connection is closed; the log gets one short line per interval, never the
peer's bytes. Accepting and caps are ``_listener``'s (the ``ConnectionOwner``);
what a handler sees is ``_request``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import httptools

from ..audit import AuditEvent
from ..authz._calls import Peer
from ..errors import InvalidRequest, SignerdError
from ._limits import Limits, Throttled
from ._request import Request, Response, render_error

__all__ = ["Connection", "ConnectionOwner", "Dispatch", "Precheck"]

Dispatch = Callable[[Request], Awaitable[Response]]
Precheck = Callable[[Request], SignerdError | None]

log = logging.getLogger("signerd.server")

_MAX_HEAD_BYTES = 16384  # request line and headers together
_MAX_HEADERS = 64
_MAX_PIPELINED = 16  # complete requests waiting behind the one being answered


class ConnectionOwner(Protocol):
    """What a connection needs of the server that accepted it (the ``Listener``)."""

    limits: Limits
    answering: int  # requests handed over and not answered yet (all connections)
    bad_http: Throttled  # malformed requests, counted
    timed_out: Throttled  # connections cut at a deadline, counted
    dispatch: Dispatch  # the answer to a request whose body has arrived (or refused early)
    precheck: Precheck  # at the end of a head with a body: the refusal to answer at once

    def forget(self, conn: Connection) -> None:
        """The connection is gone."""
        ...


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parse, enforce deadlines and limits, answer in order.

    A request is handed to the server once its body has arrived, except one
    refused from its head (no grant, body over the limit): that one is answered
    at once and the rest of its body is read and dropped, never kept. Reading
    pauses when the peer starts another request while one is being answered
    (pipelining) and while it does not read its answers, so a connection holds
    at most one body. Deadlines are times the listener's sweeper checks, not a
    timer per request.
    """

    def __init__(self, owner: ConnectionOwner, loop: asyncio.AbstractEventLoop, uid: int) -> None:
        self.owner, self.loop, self.uid = owner, loop, uid
        self.limits = owner.limits
        self.transport: asyncio.Transport | None = None
        self.sock: Any = None  # the connected socket, for the peer lookup
        self.parser = httptools.HttpRequestParser(self)
        self.peer: Peer | None = None  # looked up on first use (or when it was accepted)
        self.stranger = False  # no policy rule names the caller (smaller caps)
        self.pending: asyncio.Task[None] | None = None
        self.deadline: float | None = None  # loop time at which the connection is cut
        self._timing_head = False  # the deadline is a request head's
        self._in_message = False  # between the first byte of a request and its end
        self._url = b""
        self._head_bytes = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._current: Request | None = None  # being parsed
        self._queue: deque[Request] = deque()  # handed over, waiting for their turn
        self._active: Request | None = None  # being answered
        self._close_after: Request | None = None  # answered; close once its body is in
        self._closing = False
        self._idle_close = False
        self._write_paused = False
        self._hold = False  # the peer pipelines: read no further until it is our turn
        self._read_paused = False

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.sock = transport.get_extra_info("socket")
        self._arm(self.limits.header_timeout, head=True)  # the first head is due from connect

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._disarm()
        for req in (self._current, *self._queue):
            if req is not None:
                req.release()  # now, not when the garbage collector finds the cycles
        self._current = None
        self._queue.clear()
        self.owner.forget(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reject("upgrade")
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # llhttp wraps what a callback raised
            if cause is not None and not isinstance(cause, _Refused):
                log.error("signerd.internal_error where=parser error=%s", type(cause).__name__)
            self._reject(cause.why if isinstance(cause, _Refused) else "parse")

    def eof_received(self) -> bool:
        """The peer stopped sending: answer what is in progress, then close."""
        self._idle_close = True
        if not self.busy:
            self._close()  # nothing to answer (or answered, waiting for a body that ends here)
        return True

    def pause_writing(self) -> None:
        self._write_paused = True
        self._reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._reading()

    # --- llhttp callbacks ---

    def on_message_begin(self) -> None:
        self._url, self._head_bytes, self._headers = b"", 0, []
        self._in_message = True
        if self.busy:
            self._hold = True  # pipelined: this one waits, and so does the socket
            self._reading()
        elif self._close_after is None and not self._timing_head:
            self._arm(self.limits.header_timeout, head=True)

    def on_url(self, url: bytes) -> None:
        self._head_bytes += len(url)
        if self._head_bytes > _MAX_HEAD_BYTES:
            raise _HeadTooLarge()
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > _MAX_HEAD_BYTES or len(self._headers) >= _MAX_HEADERS:
            raise _HeadTooLarge()
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if len(self._queue) >= _MAX_PIPELINED:
            raise _TooManyPipelined()
        parser = self.parser
        req = Request(
            method=parser.get_method().decode("ascii", "replace"),
            raw_url=self._url,
            raw_headers=self._headers,
            keep_alive=parser.should_keep_alive(),
            slot=self,
        )
        self._current = req
        length = req.content_length
        chunked = "chunked" in str(req.headers.get("transfer-encoding", "")).lower()
        req.has_body = chunked or (length is not None and length > 0)
        if not req.has_body:
            return
        if length is not None and length > self.limits.max_body_bytes:
            req.too_large = True
        elif length is not None:
            req.expect(length)
        if not self.busy:
            self._arm(self.limits.body_timeout)
        req.refused = self.owner.precheck(req)
        if req.refused is not None or req.too_large:
            self._hand_over(req)  # answered now; the rest of the body is dropped
        elif (
            str(req.headers.get("expect", "")).lower() == "100-continue"
            and not self.busy
            and self.transport is not None
        ):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        req = self._current
        if req is None or req.refused is not None or req.too_large:
            return
        if not req.append(body, self.limits.max_body_bytes):
            req.too_large = True
            req.release()

    def on_message_complete(self) -> None:
        req, self._current = self._current, None
        self._in_message = False
        if req is None:
            return
        req.complete = True
        if not req.started:
            self._hand_over(req)
        elif req is self._close_after:
            self._close()
        elif req is self._active:
            self._disarm()
        elif req not in self._queue:
            self._next()  # answered early, and now its body is in: on to the next request

    # --- answering, in order ---

    def _hand_over(self, req: Request) -> None:
        req.started = True
        if self.busy:
            self._queue.append(req)
            self._hold = True
            self._reading()
            return
        self._begin(req)

    def _begin(self, req: Request) -> None:
        self._active = req
        if req.complete:
            self._disarm()
        else:
            self._arm(self.limits.body_timeout)  # answered early: the rest is read and dropped
        self.owner.answering += 1  # from now: a request that arrived with others sees them
        self.loop.create_task(self._answer(req))

    async def _answer(self, req: Request) -> None:
        try:
            response = await self.owner.dispatch(req)
        finally:
            self.owner.answering -= 1
            self._active = None
            req.release()  # answered: its body's memory goes back now
        if self._closing or self.transport is None:
            response.written()
            return
        keep = req.keep_alive and not self._idle_close and not req.too_large
        keep = keep and (req.complete or req.refused is None)
        self.transport.write(response.encode(keep_alive=keep, head=req.method == "HEAD"))
        response.written()
        if not keep:
            if req.complete:
                self._close()
            else:
                self._close_after = req  # let the peer finish sending, then close
                self._hold = False
                self._reading()
            return
        if req.complete:
            self._next()

    def _next(self) -> None:
        if self._closing:
            return
        if self._queue:
            self._begin(self._queue.popleft())
            return
        if self._idle_close:
            self._close()
            return
        self._hold = False
        if self._current is not None:
            self._arm(self.limits.body_timeout)  # a pipelined body is still coming
        elif self._in_message:
            self._arm(self.limits.header_timeout, head=True)  # so is a pipelined head
        else:
            self._arm(self.limits.keepalive_timeout)
        self._reading()

    # --- limits and errors ---

    def _reject(self, why: str) -> None:
        """Malformed HTTP: one 400 answer, one throttled log line (no peer bytes), then close."""
        self.owner.bad_http.note(uid=self.uid, why=why)
        if self.transport is not None and not self.busy:
            self.transport.write(render_error(InvalidRequest("malformed HTTP request")))
        self._close()

    def stall_record(self, exc: SignerdError) -> AuditEvent | None:
        """The audit record of the answer ``last_answer(exc)`` would give now, if any."""
        req = self._active
        if req is None or self.transport is None or self._closing or req.context is None:
            return None
        context = req.context
        return context.stall_record(context.stall_answer or exc)

    def last_answer(self, exc: SignerdError) -> bool:
        """From another thread while the loop's thread is stuck in a call (the process ends
        next): ``exc`` as the answer to the request in progress, written to the socket
        directly. Nothing when an answer is half sent. A request may name its own answer
        (``stall_answer``: an admin change under way). A connection with no request in
        progress gets ``exc`` too (its request may be unread, or still on its way): the
        process ends next, so whatever it sends was never acted on, and the caller is
        told so rather than finding its connection closed under its request. So does one
        accepted whose transport the stuck loop never attached (its socket from ``_admit``)."""
        req, transport = self._active, self.transport
        if self._closing:
            return False
        context = req.context if req is not None else None
        rid = "-"
        if context is not None:
            rid = context.rid
            if context.stall_answer is not None:
                exc = context.stall_answer
        if transport is None:
            sock = self.sock
        elif transport.get_write_buffer_size():
            return False
        else:
            sock = transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            os.write(sock.fileno(), render_error(exc, rid))
        except (OSError, ValueError):  # closed meanwhile, or the buffer is full
            return False
        return True

    def expired(self) -> None:
        """The deadline passed (the listener's sweeper calls this)."""
        self.deadline, self._timing_head = None, False
        if self._active is not None and self._active.complete:
            return  # an answer is being made; the backend has its own deadline
        self.owner.timed_out.note(uid=self.uid)
        self.abort()

    def _arm(self, seconds: float, *, head: bool = False) -> None:
        self.deadline = self.loop.time() + seconds
        self._timing_head = head

    def _disarm(self) -> None:
        self.deadline, self._timing_head = None, False

    def _reading(self) -> None:
        """Read while nothing holds the connection back; pause otherwise."""
        if self.transport is None or self._closing:
            return
        pause = self._write_paused or self._hold
        if pause and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()
        elif not pause and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def close_when_idle(self) -> None:
        self._idle_close = True
        if not self.busy:
            self._close()

    def _close(self) -> None:
        if not self._closing and self.transport is not None:
            self._closing = True
            self._disarm()
            self.transport.close()

    def abort(self) -> None:
        self._closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()
        elif self.pending is not None:
            self.pending.cancel()


class _Refused(Exception):
    """Raised in a parser callback to refuse the connection; ``why`` goes to the log."""

    why = "refused"


class _HeadTooLarge(_Refused):
    why = "head_too_large"


class _TooManyPipelined(_Refused):
    why = "pipelined"
