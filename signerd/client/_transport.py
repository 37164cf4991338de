"""How the clients' requests travel: two transports over the daemon's Unix socket.

Both run the ``Op`` objects of ``_ops``:

- ``SyncTransport``: ``http.client`` on ``AF_UNIX``, a pool of idle
  keep-alive connections (one per concurrent thread: thread-safe without
  serialising callers), each checked for a close from the daemon before
  reuse; the pool is dropped after ``fork()``.
- ``AsyncTransport``: aiohttp's ``UnixConnector``, which pools the same way.

Connect, send and the whole answer must fit in the call's timeout. A
``retry_safe`` request (reads, sign, verify) is sent once more, on a fresh
connection, when a reused one turns out broken. An ``admin`` request
(create, rotate, promote, retire, destroy, trusted keys) carries an
``Idempotency-Key`` made for the call; when its connection breaks after it
was sent, it times out, or signerd answers ``outcome_unknown``, it is sent
again with the same key (three times in all; after such an attempt, also when
a later one is refused as retryable, e.g. the admin lock busy), and signerd
answers what the first one did instead of acting twice. When the outcome is
still in doubt at the end, the call raises ``OutcomeUnknown``.
"""

from __future__ import annotations

import http.client
import os
import secrets
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, NoReturn, TypeVar

from ..errors import BackendUnavailable, OutcomeUnknown, SignerdError
from ._ops import Op, decode_answer
from ._refusal import answer_before_close, closed_on_us, refusal

if TYPE_CHECKING:  # aiohttp is imported by AsyncTransport when used (signerctl never is)
    import aiohttp

DEFAULT_SOCKET = "/run/signerd/signerd.sock"
DEFAULT_TIMEOUT = 10.0
_ADMIN_PAUSES = (0.2, 0.5)  # seconds between the (at most three) sends of an admin request
_READ_CHUNK = 65536
T = TypeVar("T")


class ConnectionFailed(BackendUnavailable):
    """signerd could not be reached, or the connection broke during the call.

    Raised by the client, never sent by the daemon. It is a
    ``BackendUnavailable`` (retryable): to a caller, a daemon that does not
    answer and a token that does not answer both mean "no signing right now".
    Its ``request_id`` is None, since no answer came.
    """

    default_message = "cannot reach signerd"
    sent = True  # the request may have reached signerd (False: no connection was made)


class RequestTimeout(ConnectionFailed):
    """signerd did not answer completely within the call's timeout."""

    default_message = "signerd did not answer in time"


def default_socket_path() -> str:
    """``$SIGNERD_SOCKET`` when set and not empty, else ``/run/signerd/signerd.sock``."""
    return os.environ.get("SIGNERD_SOCKET") or DEFAULT_SOCKET


def _remaining(deadline: float, timeout: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise _late(timeout)
    return left


def _dropped(sock: socket.socket) -> bool:
    """Whether an idle connection is unusable: the daemon closed it (or sent something)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client.HTTPConnection`` whose ``connect()`` opens an ``AF_UNIX`` stream."""

    def __init__(self, socket_path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = socket_path
        self.opened = False  # connect() succeeded once: a request may have gone out

    def connect(self) -> None:
        """Connect within the timeout, waiting while the daemon's backlog is full.

        A Unix stream socket answers EAGAIN at once, not EINPROGRESS, when the
        listener's backlog is full, and there is nothing to poll for: try again,
        a little later each time, until the timeout.
        """
        timeout = self.timeout if isinstance(self.timeout, int | float) else DEFAULT_TIMEOUT
        deadline = time.monotonic() + timeout
        pause = 0.001
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.socket_path)
            except BlockingIOError:
                sock.close()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the daemon's backlog stayed full") from None
                time.sleep(min(pause, left))
                pause = min(pause * 2, 0.05)
                continue
            except BaseException:
                sock.close()
                raise
            self.sock = sock
            self.opened = True
            return


class SyncTransport:
    """A pool of keep-alive connections to one socket; safe to share between threads."""

    def __init__(self, socket_path: str, *, max_idle: int = 16) -> None:
        self.socket_path = socket_path
        self._max_idle = max_idle
        self._idle: list[UnixHTTPConnection] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.connections_opened = 0  # how many sockets this transport has opened

    def run(self, op: Op[T], timeout: float) -> T:
        if not op.admin:
            return self._send(op, timeout, None)
        key, doubt = new_idempotency_key(), _Doubt()
        for pause in _ADMIN_PAUSES:
            try:
                return self._send(op, timeout, key)
            except SignerdError as exc:
                doubt.again(exc)
            time.sleep(pause)
        try:
            return self._send(op, timeout, key)
        except SignerdError as exc:
            doubt.fail(exc)

    def _send(self, op: Op[T], timeout: float, key: str | None) -> T:
        deadline = time.monotonic() + timeout
        body = op.encoded()
        for attempt in (1, 2):
            conn = self._checkout()
            reused = conn.sock is not None
            try:
                status, request_id, data = self._exchange(
                    conn, op.method, op.path, body, deadline, timeout, key
                )
            except TimeoutError as exc:
                conn.close()
                raise _late(timeout) from exc
            except RequestTimeout:
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                if attempt == 1 and reused and op.retry_safe:
                    continue
                failed = _unreachable(self.socket_path, exc)
                failed.sent = conn.opened
                raise failed from exc
            self._checkin(conn)
            return op.parse(*decode_answer(status, request_id, data))
        raise AssertionError("unreachable")  # pragma: no cover

    def _exchange(
        self,
        conn: UnixHTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        deadline: float,
        timeout: float,
        key: str | None = None,
    ) -> tuple[int, str | None, bytes]:
        conn.timeout = _remaining(deadline, timeout)
        if conn.sock is None:
            self.connections_opened += 1
            conn.connect()
        sock = conn.sock
        assert sock is not None
        sock.settimeout(_remaining(deadline, timeout))
        try:
            conn.request(method, path, body=body, headers=_headers(body, key))
        except (BrokenPipeError, ConnectionResetError):
            answer = answer_before_close(sock, method)  # e.g. 503 over the connection cap
            conn.close()
            if answer is None:
                raise
            return answer
        sock.settimeout(_remaining(deadline, timeout))
        resp = conn.getresponse()
        chunks = []
        while not resp.isclosed():  # closed: all read, and the answer said Connection: close
            sock.settimeout(_remaining(deadline, timeout))
            chunk = resp.read(_READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
        if resp.will_close:
            conn.close()
        return resp.status, resp.getheader("X-Request-Id"), b"".join(chunks)

    def _checkout(self) -> UnixHTTPConnection:
        with self._lock:
            if self._pid != os.getpid():  # forked: these sockets belong to the parent
                self._idle.clear()
                self._pid = os.getpid()
            while self._idle:
                conn = self._idle.pop()
                if conn.sock is not None and not _dropped(conn.sock):
                    return conn
                conn.close()
        return UnixHTTPConnection(self.socket_path, DEFAULT_TIMEOUT)

    def _checkin(self, conn: UnixHTTPConnection) -> None:
        if conn.sock is None:
            return
        with self._lock:
            if len(self._idle) < self._max_idle and self._pid == os.getpid():
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class AsyncTransport:
    """aiohttp over the socket; the session is made in the running loop on first use."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.UnixConnector(path=self.socket_path)
            self._session = aiohttp.ClientSession(
                base_url="http://localhost", connector=connector, raise_for_status=False
            )
        return self._session

    async def run(self, op: Op[T], timeout: float) -> T:
        if not op.admin:
            return await self._send(op, timeout, None)
        key, doubt = new_idempotency_key(), _Doubt()
        for pause in _ADMIN_PAUSES:
            try:
                return await self._send(op, timeout, key)
            except SignerdError as exc:
                doubt.again(exc)
            await _asyncio_sleep(pause)
        try:
            return await self._send(op, timeout, key)
        except SignerdError as exc:
            doubt.fail(exc)

    async def _send(self, op: Op[T], timeout: float, key: str | None) -> T:
        import aiohttp

        session = self._get_session()
        body = op.encoded()
        headers = _headers(body, key)
        client_timeout = aiohttp.ClientTimeout(total=timeout)
        deadline = time.monotonic() + timeout
        # aiohttp itself resends a GET once when a reused connection was closed;
        # a retry-safe POST (sign, verify) gets the same single retry here.
        attempts = 2 if op.retry_safe and op.method != "GET" else 1
        for attempt in range(1, attempts + 1):
            try:
                async with session.request(
                    op.method, op.path, data=body, headers=headers, timeout=client_timeout
                ) as resp:
                    data = await resp.read()
                    request_id = resp.headers.get("X-Request-Id")
                return op.parse(*decode_answer(resp.status, request_id, data))
            except TimeoutError as exc:
                raise _late(timeout) from exc
            except aiohttp.ClientConnectorError as exc:
                failed = _unreachable(self.socket_path, exc.os_error)
                failed.sent = False
                raise failed from exc
            except (aiohttp.ClientError, OSError) as exc:
                if attempt < attempts:
                    left = deadline - time.monotonic()
                    if left > 0:
                        client_timeout = aiohttp.ClientTimeout(total=left)
                        continue
                refused = await refusal(self.socket_path) if closed_on_us(exc) else None
                if refused is not None:  # e.g. 503 over the connection cap
                    return op.parse(*decode_answer(*refused))
                raise _unreachable(self.socket_path, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _headers(body: bytes | None, key: str | None = None) -> dict[str, str]:
    headers = {"Accept": "application/json"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


def new_idempotency_key() -> str:
    """A fresh Idempotency-Key: 32 characters of base64url (192 random bits)."""
    return secrets.token_urlsafe(24)


class _Doubt:
    """The attempts of one admin call: whether one of them may have acted."""

    def __init__(self) -> None:
        self.seen = False

    def again(self, exc: SignerdError) -> None:
        """Return to send the request again (with its key); raise what ends the call."""
        if isinstance(exc, OutcomeUnknown) or (isinstance(exc, ConnectionFailed) and exc.sent):
            self.seen = True  # it may have acted: only its key can tell
        elif not (self.seen and exc.retryable):
            self.fail(exc)

    def fail(self, exc: SignerdError) -> NoReturn:
        """Raise what ends the call: after an attempt that may have acted, a later failure
        that is not a refusal of the request itself (a 5xx, no answer) is OutcomeUnknown."""
        if not self.seen or exc.status < 500 or isinstance(exc, OutcomeUnknown):
            raise exc
        raise OutcomeUnknown(
            f"the operation may or may not have taken effect ({exc.message})",
            request_id=exc.request_id,
        ) from exc


def _late(timeout: float) -> RequestTimeout:
    return RequestTimeout(f"no answer from signerd within {timeout:g}s")


def _unreachable(socket_path: str, exc: BaseException) -> ConnectionFailed:
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
    return ConnectionFailed(f"cannot reach signerd at {socket_path}: {why}")
