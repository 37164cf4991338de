"""Transit signs from the worker's event loop: no thread, no hand-off.

``SignClient`` sends each sign from an executor thread, over that thread's
kept-alive socket: the loop hands the call to a thread, the thread wakes, sends,
blocks in ``recv``, and hands the answer back. On a small machine those hops
cost more than the HTTP exchange itself. ``LoopSigner`` sends the same request
on a kept-alive asyncio connection of the loop's own (at most ``limit`` per
loop), parsed by httptools as it arrives, so a sign costs one write and one
read on the loop.

It takes only the plain case: a path that needs no quoting, a token that is
not due for renewal, a node in use that is not due for its health check, a
connection to spare, and a 200 answer. For anything else ``post`` returns
None, and the sign goes the blocking way (``SignClient.post`` in the executor),
which logs in, fails over, retries and translates errors as it always did.
Signing is safe to repeat, so an exchange that fails before its answer is
read is simply sent again that way. A node that does not answer within
``timeout`` is an outage now (``BackendUnavailable``), as on the blocking
path, and its health is checked before the next sign uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl

import httptools

from ...errors import BackendUnavailable
from ._http import Json
from ._sign import MAX_ANSWER, PATH_RE, TOKEN_RE, Answer, SignClient, json_object, log_cause

__all__ = ["LoopSigner"]


class _Link(asyncio.Protocol):
    """One kept-alive connection to a node: one request at a time, its answer parsed as
    it arrives (``Answer``, as the blocking path's). Anything wrong (a dropped connection,
    a malformed or oversized answer, bytes nobody asked for) ends the connection and fails
    the request in progress."""

    def __init__(self, addr: str) -> None:
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.open = True
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._answer: Answer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionResetError("Vault closed the connection"))

    def data_received(self, data: bytes) -> None:
        answer = self._answer
        if answer is None:
            self._fail(ConnectionError("Vault sent what nobody asked for"))
            return
        try:
            answer.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            return
        if answer.size > MAX_ANSWER:
            self._fail(ConnectionError("answer too large"))
        elif answer.complete:
            waiter, self._waiter, self._answer = self._waiter, None, None
            if not answer.keep_alive:
                self.close()
            if waiter is not None and not waiter.done():
                waiter.set_result((answer.parser.get_status_code(), b"".join(answer.body)))

    def exchange(self, request: bytes) -> asyncio.Future[tuple[int, bytes]]:
        """Send ``request``; its answer: (status, body)."""
        assert self.transport is not None and self._waiter is None
        self._waiter = asyncio.get_running_loop().create_future()
        self._answer = Answer()
        self.transport.write(request)
        return self._waiter

    def _fail(self, exc: Exception) -> None:
        self.close()
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        self.open = False
        self._answer = None
        if self.transport is not None:
            self.transport.close()


class LoopSigner:
    """POSTs signs from the running loop over its own kept-alive connections."""

    def __init__(self, client: SignClient, limit: int) -> None:
        self._client = client
        self._limit = max(1, limit)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: list[_Link] = []
        self._busy = 0  # links out of the idle list: exchanging or connecting
        #: signs sent this way, and those left to the blocking path (tests, debugging)
        self.sent = 0
        self.declined = 0

    async def post(self, path: str, body: Json) -> Json | None:
        """POST ``body`` to ``v1/<path>`` from this loop; the JSON answer, or None when
        this one has to go the blocking way (``SignClient.post``)."""
        answer = await self._post(path, body)
        if answer is None:
            self.declined += 1
        else:
            self.sent += 1
        return answer

    async def _post(self, path: str, body: Json) -> Json | None:
        client = self._client
        nodes = client.nodes
        token = client.auth.cached()
        if (
            token is None
            or nodes.due()
            or not PATH_RE.fullmatch(path)
            or not TOKEN_RE.fullmatch(token[0])
        ):
            return None
        addr = nodes.current
        link = await self._link(addr)
        if link is None:
            return None
        payload = json.dumps(body, separators=(",", ":")).encode()
        request = client.request(addr, path, payload, token[0])
        try:
            async with asyncio.timeout(client.timeout):
                status, answer = await link.exchange(request)
        except TimeoutError as exc:
            link.close()
            nodes.check_soon()  # the blocking path probes it before the next sign
            log_cause(exc, BackendUnavailable.code)
            raise BackendUnavailable("Vault did not answer in time") from exc
        except (ConnectionError, httptools.HttpParserError):
            link.close()
            return None
        except BaseException:
            link.close()  # cancelled: its answer may still come, to nobody
            raise
        finally:
            self._busy = max(0, self._busy - 1)  # (0 again if another loop took over)
            if link.open and link.addr == nodes.current:
                self._idle.append(link)
            elif link.open:
                link.close()
        if status != 200:
            return None
        return json_object(answer, path, status)

    async def _link(self, addr: str) -> _Link | None:
        """An idle connection to ``addr``, or a new one while under the limit; None when
        every connection is in use, or a new one cannot be made at once."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # another loop (a new worker): nothing carries over
            self._loop, self._idle, self._busy = loop, [], 0
        while self._idle:
            link = self._idle.pop()
            if link.open and link.addr == addr:
                self._busy += 1
                return link
            link.close()
        if self._busy >= self._limit:
            return None
        self._busy += 1
        client = self._client
        host, port, _ = client.endpoint(addr)
        context = client.tls_context
        try:
            async with asyncio.timeout(client.timeout):
                _, link = await loop.create_connection(
                    lambda: _Link(addr),
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError):
            self._busy -= 1
            return None  # the blocking path tries, fails over and says why
        except BaseException:
            self._busy -= 1
            raise
        return link

    def close(self) -> None:
        """Close every idle connection (from any thread)."""
        loop, idle, self._idle = self._loop, self._idle, []
        if loop is None or loop.is_closed():
            return
        for link in idle:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(link.close)
