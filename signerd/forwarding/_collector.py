"""The connection to the collector: TCP or TLS, and what its TCP stack acknowledged.

A frame counts as acknowledged once the collector's TCP stack acknowledged its last
byte (SIOCOUTQ) while the connection was established, or closing cleanly (the
collector sent FIN: a TCP stack sends FIN only once its application read everything,
else it resets). A connection that ends by a reset while established is told apart
(``reset``): bytes acknowledged just before may never have been read there. A reset
that answers bytes sent after the collector's FIN (EPIPE) is a clean close.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import select
import socket
import ssl
import struct
import termios
import threading
import time
from collections.abc import Callable

from ._settings import ForwardingSettings
from ._syslog import frame

__all__ = ["Collector", "open_connection"]

log = logging.getLogger("signerd.forwarding")

_POLL = 0.05
_TCP_ESTABLISHED = 1
_TCP_CLOSE_WAIT = 8  # the collector closed its side cleanly (it read everything it got)


class Collector:
    """One connection at a time to the configured collector, opened again with backoff."""

    def __init__(self, settings: ForwardingSettings, stopping: threading.Event) -> None:
        self.s = settings
        self.stopping = stopping
        self.sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = 0.1

    def connected(self) -> bool:
        """Whether there is a connection (one is tried when due)."""
        if self.sock is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            sock = open_connection(self.s)
        except OSError as exc:
            if self._backoff <= 0.1:
                log.error(
                    "signerd.forwarding_collector_down host=%s port=%d error=%s",
                    self.s.host,
                    self.s.port,
                    exc.strerror or type(exc).__name__,
                )
            self._retry_at = now + self._backoff
            self._backoff = min(5.0, self._backoff * 2)
            return False
        sock.setblocking(False)
        self.sock, self._backoff = sock, 0.1
        log.info("signerd.forwarding_connected host=%s port=%d", self.s.host, self.s.port)
        return True

    def ended(self) -> bool | None:
        """Between sends: None while the connection is up; else it is dropped here and the
        answer is whether it ended by a reset (True) or a clean close (False)."""
        sock = self.sock
        if sock is None:
            return None
        try:
            state = _state(sock)
        except OSError:
            state = 0
        if state == _TCP_ESTABLISHED:
            return None
        reset = state != _TCP_CLOSE_WAIT and _was_reset(sock, None)
        self._lost(None, 0, 0, reset=reset)
        return reset

    def disconnect(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def send(
        self, messages: list[bytes], tick: Callable[[], None] | None = None
    ) -> tuple[int, bool]:
        """Send ``messages`` (octet-counted); how many of them (from the first) the
        collector acknowledged, and whether the connection ended by a reset (not a clean
        close: see ``_replay``)."""
        sock = self.sock
        assert sock is not None
        frames = [frame(m) for m in messages]
        ends, total = [], 0
        for f in frames:
            total += len(f)
            ends.append(total)
        data = memoryview(b"".join(frames))
        sent, acked = 0, 0
        progress = time.monotonic()
        tls = isinstance(sock, ssl.SSLSocket)
        while acked < len(frames):
            if tick is not None:
                tick()  # a long send still tells the workers it is alive
            try:
                if sent < len(data) and _state(sock) == _TCP_ESTABLISHED:
                    _, writable, _ = select.select([], [sock], [], _POLL)
                    if writable:
                        with contextlib.suppress(
                            BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError
                        ):
                            sent += sock.send(data[sent : sent + (1 << 16)])
                            progress = time.monotonic()
                else:
                    time.sleep(0.0005)
                unacked = _outq(sock)  # before the state: a reset empties the queue
                state = _state(sock)
            except (OSError, ssl.SSLError) as exc:
                return self._lost(exc, acked, len(frames), reset=_was_reset(sock, exc))
            if state not in (_TCP_ESTABLISHED, _TCP_CLOSE_WAIT):  # reset: ``unacked`` is void
                return self._lost(None, acked, len(frames), reset=_was_reset(sock, None))
            if tls:  # TLS records do not map to our bytes: all of it, once all is acknowledged
                done = len(data) if sent == len(data) and unacked == 0 else 0
            else:
                done = sent - unacked
            while acked < len(frames) and ends[acked] <= done:
                acked += 1
                progress = time.monotonic()
            if state == _TCP_CLOSE_WAIT:  # closed cleanly: it read all it acknowledged
                return self._lost(None, acked, len(frames), reset=False)
            if time.monotonic() - progress > self.s.timeout:
                log.warning(
                    "signerd.forwarding_collector_stalled host=%s port=%d", self.s.host, self.s.port
                )
                self.disconnect()
                return acked, False
            if self.stopping.is_set() and time.monotonic() - progress > 1.0:
                self.disconnect()
                return acked, False
        return acked, False

    def _lost(
        self, exc: BaseException | None, acked: int, of: int, *, reset: bool
    ) -> tuple[int, bool]:
        log.warning(
            "signerd.forwarding_connection_lost host=%s port=%d how=%s error=%s acked=%d of=%d",
            self.s.host,
            self.s.port,
            "reset" if reset else "closed",
            "-" if exc is None else getattr(exc, "strerror", None) or type(exc).__name__,
            acked,
            of,
        )
        self.disconnect()
        return acked, reset


def open_connection(settings: ForwardingSettings) -> socket.socket:
    """A connection to the collector, in TLS when configured (the collector's certificate
    checked against ``tls_ca_file`` and the name; this host's shown when it asks)."""
    s = settings
    sock = socket.create_connection((s.host, s.port), timeout=s.timeout)
    if not s.tls:
        return sock
    try:
        context = ssl.create_default_context(cafile=s.tls_ca_file)
        if s.tls_cert_file is not None:
            context.load_cert_chain(s.tls_cert_file, s.tls_key_file)
        return context.wrap_socket(sock, server_hostname=s.tls_server_name or s.host)
    except BaseException:
        sock.close()
        raise


def _was_reset(sock: socket.socket, exc: BaseException | None) -> bool:
    """Whether the connection ended with the collector's bytes unread: a reset that came
    while it was established (ECONNRESET). A reset answering what we sent after its
    clean close (FIN: it had read everything) is EPIPE: nothing it acknowledged is lost."""
    code = getattr(exc, "errno", None) if exc is not None else None
    if code is None:
        with contextlib.suppress(OSError):
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    return code != errno.EPIPE


def _outq(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _state(sock: socket.socket) -> int:
    """The connection's TCP state (TCP_INFO's first byte: 1 established, 8 close-wait)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
