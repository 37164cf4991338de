"""The answer of a daemon that refused a connection (its connection cap), when the request
found the connection closed: signerd writes one prepared 503 at once, then closes."""

from __future__ import annotations

import errno
import http.client
import io
import socket

__all__ = ["answer_before_close", "closed_on_us", "refusal"]

# a refusal's answer is read from a fresh connection within this, and is at most this long
_REFUSAL_WAIT = 0.5
_REFUSAL_MAX = 8192
_READ_CHUNK = 65536
_CLOSED = (errno.EPIPE, errno.ECONNRESET)


def closed_on_us(exc: BaseException) -> bool:
    """Whether the daemon closed the connection before answering (EPIPE, a reset, EOF)."""
    import aiohttp

    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    errors = (getattr(exc, "os_error", None), exc.__cause__, exc)
    return any(isinstance(e, OSError) and e.errno in _CLOSED for e in errors)


async def refusal(socket_path: str) -> tuple[int, str | None, bytes] | None:
    """What signerd writes at once to a new connection it refuses (then closes), read from a
    fresh connection that sends nothing; None when a new connection is not refused so.

    aiohttp has dropped the refused connection with its answer by the time it reports the
    broken pipe, so the answer is asked for again."""
    import asyncio

    try:
        async with asyncio.timeout(_REFUSAL_WAIT):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            try:
                data = b""
                while chunk := await reader.read(_READ_CHUNK):
                    data += chunk
                    if len(data) > _REFUSAL_MAX:
                        return None
            finally:
                writer.close()
    except (TimeoutError, OSError):
        return None
    return answer_before_close(_Received(data), "GET") if data else None


class _Received:
    """Bytes already read, in the shape http.client reads a response from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self._data)


def answer_before_close(
    sock: socket.socket | _Received, method: str
) -> tuple[int, str | None, bytes] | None:
    """The answer signerd wrote before closing a connection it refused (its connection cap),
    which the request then found closed; None when there is none."""
    resp = http.client.HTTPResponse(sock, method=method)  # type: ignore[arg-type]
    try:
        resp.begin()
        data = resp.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        resp.close()
    return resp.status, resp.getheader("X-Request-Id"), data
