"""What a handler sees of a request, and what it answers.

``Request`` is one parsed request: ``method``, ``match_info``, ``query``,
``headers``, ``content_type``, ``can_read_body`` and ``await read()``; what the
server learns about it while answering is the ``RequestContext``
(``_context``), not items stored on the request. ``Response`` and
``json_response`` make answers. Nothing here keeps more than
``max_body_bytes`` of a body, nor more than has arrived; a large body's
memory goes back to the system once its request is answered or its
connection is gone.
"""

from __future__ import annotations

import http
import json
import logging
import mmap
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote_to_bytes

import httptools

from ..audit import AuditEvent
from ..authz._calls import Peer
from ..errors import InvalidRequest, PayloadTooLarge, SignerdError

__all__ = [
    "Answering",
    "Headers",
    "PeerSlot",
    "Request",
    "Response",
    "json_response",
    "render_error",
]

log = logging.getLogger("signerd.server")

MAPPED_BODY = 65536  # declared bodies this large are held in a mapping of their own


class Headers(Mapping[str, str]):
    """Request headers, looked up case-insensitively; the first of repeated names wins."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._map: dict[str, str] = {}
        for name, value in raw:
            key = name.decode("latin-1").lower()
            if key not in self._map:
                self._map[key] = value.decode("latin-1")

    def __getitem__(self, name: str) -> str:
        return self._map[name.lower()]

    def get(self, name: str, default: Any = None) -> Any:
        return self._map.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._map

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)

    def __len__(self) -> int:
        return len(self._map)


def _parse_query(raw: bytes) -> tuple[dict[str, str], SignerdError | None]:
    """Query parameters, each named once with a non-empty UTF-8 value, or the error to raise.

    An empty value (``tenant=``, ``tenant``) is never taken for an absent
    parameter, and a repeated one is never resolved by picking one of them:
    either is a 400, as is a name or value that is not UTF-8.
    """
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(
            raw.decode("latin-1"), keep_blank_values=True, strict_parsing=False, errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        return {}, InvalidRequest("the query string is not UTF-8")
    for name, value in pairs:
        if name in query:
            return {}, InvalidRequest("a query parameter is repeated")
        if not value:
            return {}, InvalidRequest("a query parameter is empty")
        query[name] = value
    return query, None


class PeerSlot(Protocol):
    """Where a request finds its caller: the connected socket, and the caller found on it
    (looked up on first use, then kept for every request of the connection)."""

    sock: Any  # the connected socket (asyncio's or uvloop's socket-like object), or None
    peer: Peer | None


class Answering(Protocol):
    """What the connection reads of a request being answered (``RequestContext``)."""

    rid: str
    stall_answer: SignerdError | None  # the answer any 5xx becomes (an admin change acting)

    def stall_record(self, answer: SignerdError) -> AuditEvent | None:
        """The audit record of ``answer`` given by the stall guard (None: no record)."""
        ...


class Request:
    """One parsed request head plus (at most ``max_body_bytes`` of) its body."""

    __slots__ = (
        "_filled",
        "_mapped",
        "_path",
        "_query",
        "_query_error",
        "buffer",
        "complete",
        "context",
        "has_body",
        "headers",
        "keep_alive",
        "match_info",
        "method",
        "raw_url",
        "refused",
        "route",
        "slot",
        "started",
        "too_large",
    )

    def __init__(
        self,
        *,
        method: str,
        raw_url: bytes,
        raw_headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        slot: PeerSlot | None = None,
    ) -> None:
        self.method = method
        self.raw_url = raw_url
        self.headers = Headers(raw_headers)
        self.keep_alive = keep_alive
        self.slot = slot  # None: a request made in-process, whose peer is unknown
        self.context: Answering | None = None  # set by dispatch
        self.buffer = bytearray()  # the body, unless ``expect`` gave it a mapping
        self._mapped: mmap.mmap | None = None
        self._filled = 0
        self.has_body = False
        self.complete = False  # the whole body has arrived
        self.started = False  # handed to the server
        self.too_large = False
        self.refused: SignerdError | None = None  # refused before the body was read
        self.match_info: dict[str, str] = {}
        self.route: Any = None  # the server's ``Route``, set by the router
        self._path: str | None = None
        self._query: dict[str, str] | None = None
        self._query_error: SignerdError | None = None

    # --- URL ---

    def _split(self) -> None:
        try:
            url = httptools.parse_url(self.raw_url)
            raw_path = url.path or b"/"
            raw_query = url.query or b""
        except httptools.HttpParserInvalidURLError:
            raw_path, raw_query = b"", b""
        try:
            self._path = unquote_to_bytes(raw_path).decode("utf-8")
        except UnicodeDecodeError:
            self._path = ""
        self._query, self._query_error = _parse_query(raw_query)

    @property
    def path(self) -> str:
        """The decoded path (for logs and routing; ``raw_segments`` keeps %2F inside a segment)."""
        if self._path is None:
            self._split()
        assert self._path is not None
        return self._path

    def raw_segments(self) -> list[str] | None:
        """Path segments, each percent-decoded on its own; None when the path is not UTF-8."""
        try:
            url = httptools.parse_url(self.raw_url)
        except httptools.HttpParserInvalidURLError:
            return None
        raw = url.path or b"/"
        out = []
        for part in raw.split(b"/")[1:]:
            try:
                out.append(unquote_to_bytes(part).decode("utf-8"))
            except UnicodeDecodeError:
                return None
        return out

    @property
    def query(self) -> Mapping[str, str]:
        """The query parameters; InvalidRequest when one is empty, repeated or not UTF-8."""
        if self._query is None:
            self._split()
        if self._query_error is not None:
            raise self._query_error
        assert self._query is not None
        return self._query

    # --- body ---

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        if value is None or not value.isascii() or not value.isdigit():
            return None
        return int(value)

    @property
    def content_type(self) -> str:
        value = self.headers.get("content-type")
        if not value:
            return "application/octet-stream"
        return str(value).split(";", 1)[0].strip().lower()

    @property
    def can_read_body(self) -> bool:
        return self.has_body

    def expect(self, length: int) -> None:
        """The body is declared ``length`` bytes long. A large one goes into an anonymous
        mapping of that size: the kernel backs its pages only as bytes arrive, and takes all
        of it back at ``release`` (a heap buffer grown chunk by chunk stays with the process)."""
        if length >= MAPPED_BODY and self._mapped is None:
            self._mapped = mmap.mmap(-1, length)

    def append(self, data: bytes, limit: int) -> bool:
        """Keep ``data`` after what arrived before; False (nothing kept) past ``limit`` bytes
        or past the declared length."""
        mapped = self._mapped
        if mapped is not None:
            end = self._filled + len(data)
            if end > min(len(mapped), limit):
                return False
            mapped[self._filled : end] = data
            self._filled = end
            return True
        if len(self.buffer) + len(data) > limit:
            return False
        self.buffer += data
        return True

    def release(self) -> None:
        """Give the body's memory back (answered, refused, or the connection is gone), and
        drop the context, so that request and context are freed without the cycle collector."""
        self.buffer = bytearray()
        self.context = None
        if self._mapped is not None:
            self._mapped.close()
            self._mapped, self._filled = None, 0

    async def read(self) -> bytes:
        """The whole body (the server hands a request over only once it has arrived)."""
        return self.body()

    def body(self) -> bytes:
        """``read()``, for a caller that does not await."""
        if self.too_large:
            raise PayloadTooLarge()
        if self._mapped is not None:
            return self._mapped[: self._filled]
        return bytes(self.buffer)


class Response:
    """A complete answer: status, headers and a body of bytes."""

    def __init__(
        self,
        *,
        body: bytes = b"",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body
        #: called once the answer is written (or its connection is gone): what follows it
        self.then: Callable[[], None] | None = None
        self.headers: dict[str, str] = {"Content-Type": content_type}
        if headers:
            self.headers.update(headers)

    def written(self) -> None:
        """The answer is written (or its connection is gone): run ``then``, which never
        fails the connection."""
        then = self.then
        if then is not None:
            try:
                then()
            except Exception as exc:
                log.error("signerd.internal_error where=after_answer error=%s", type(exc).__name__)

    def encode(self, *, keep_alive: bool, head: bool = False) -> bytes:
        status = _STATUS_LINES.get(self.status) or _status_line(self.status)
        lines = "".join([f"{k}: {v}\r\n" for k, v in self.headers.items()])
        close = "" if keep_alive else "Connection: close\r\n"
        head_bytes = f"{status}{lines}Content-Length: {len(self.body)}\r\n{close}\r\n".encode(
            "latin-1"
        )
        return head_bytes if head else head_bytes + self.body


def _status_line(status: int) -> str:
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n"


_STATUS_LINES = {int(s): _status_line(int(s)) for s in http.HTTPStatus}


_encode = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps builds one per call


def json_response(
    obj: Any, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    body = _encode(obj).encode()
    return Response(body=body, status=status, headers=headers)


def render_error(exc: SignerdError, rid: str = "-") -> bytes:
    """A whole error answer for a connection about to close (malformed HTTP, or the stall
    guard's last answer); a retryable one says when to retry, as every other answer does."""
    headers = {"Retry-After": "1"} if exc.retryable else None
    return json_response(exc.to_wire(rid), status=exc.status, headers=headers).encode(
        keep_alive=False
    )
