"""RELP, the Reliable Event Logging Protocol (rsyslog's imrelp): the collector itself
acknowledges every message.

Every frame is ``TXNR SP COMMAND SP DATALEN [SP DATA] LF``; the transaction numbers of a
session run 1, 2, 3, ... (after 999999999 comes 1 again). A session opens with ``open``
offering ``commands=syslog``; the collector answers ``rsp`` ``200 OK`` with its own
offers. Each record is one ``syslog`` frame, answered ``rsp`` ``200 OK`` once the
collector has taken the message; only then does it count as delivered. Up to ``WINDOW``
frames are in flight. A frame not answered when the connection ends (the collector went
down, its ``serverclose``, an error answer, a stall) is sent again on the next
connection, in a new session: the collector answers what it took before it closes, so a
collector that stops cleanly gets every record once. A copy can only follow a collector
that died between taking a message and answering it. ``close`` ends a session when the
forwarder stops.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from .. import __version__
from ._collector import open_connection
from ._settings import ForwardingSettings

__all__ = ["WINDOW", "RelpCollector", "RelpError", "RelpReader", "relp_frame"]

log = logging.getLogger("signerd.forwarding")

#: frames sent and not yet answered, at most
WINDOW = 128
_POLL = 0.05
_MAX_TXNR = 999_999_999
_MAX_ANSWER = 64 << 10  # an answer's DATALEN, at most (the open answer is ~100 bytes)
_HEADER = re.compile(rb"([0-9]{1,9}) ([a-z]{1,32}) ([0-9]{1,9})(?=[ \n])")
_OFFER = b"relp_version=0\nrelp_software=signerd," + __version__.encode() + b",-\ncommands=syslog"


class RelpError(Exception):
    """The collector broke the protocol (a malformed frame, an answer out of order)."""


def relp_frame(txnr: int, command: bytes, data: bytes = b"") -> bytes:
    """``TXNR SP COMMAND SP DATALEN [SP DATA] LF``."""
    head = b"%d %s %d" % (txnr, command, len(data))
    return head + (b" " + data if data else b"") + b"\n"


class RelpReader:
    """The collector's frames, out of the bytes it sent (bounded)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def take(self) -> tuple[int, bytes, bytes] | None:
        """The next whole frame (txnr, command, data), None until one is whole; RelpError
        when the bytes are not a frame."""
        buf = self.buf
        match = _HEADER.match(buf)
        if match is None:
            if len(buf) >= 64 or b"\n" in buf:
                raise RelpError("not a RELP frame")
            return None
        number, command, length = int(match.group(1)), match.group(2), int(match.group(3))
        if length > _MAX_ANSWER:
            raise RelpError("a frame longer than an answer can be")
        at = match.end()
        if length == 0:
            if len(buf) <= at:
                return None
            if buf[at] != 0x0A:
                raise RelpError("no trailer after an empty frame")
            end = at + 1
            data = b""
        else:
            end = at + 1 + length + 1
            if len(buf) < end:
                return None
            if buf[at] != 0x20 or buf[end - 1] != 0x0A:
                raise RelpError("a frame's data not between a space and its trailer")
            data = bytes(buf[at + 1 : end - 1])
        del buf[:end]  # after the match's groups were read: they point into ``buf``
        return number, command, data


def answer_code(data: bytes) -> int:
    """The status code an ``rsp`` frame's data starts with (0 when it has none)."""
    head = data[:4]
    if len(head) >= 3 and head[:3].isdigit() and (len(head) == 3 or head[3:4] in b" \n"):
        return int(head[:3])
    return 0


class _Ended(Exception):
    """The session is over (``how`` says why, for the log); what was not answered is
    sent again on the next one."""

    def __init__(self, how: str) -> None:
        self.how = how


class RelpCollector:
    """One RELP session at a time with the configured collector, opened again with backoff
    (the same interface as ``Collector``; a RELP session never asks for a replay)."""

    def __init__(self, settings: ForwardingSettings, stopping: threading.Event) -> None:
        self.s = settings
        self.stopping = stopping
        self.sock: socket.socket | None = None
        self._reader = RelpReader()
        self._txnr = 0
        self._retry_at = 0.0
        self._backoff = 0.1

    def _next_txnr(self) -> int:
        self._txnr = self._txnr % _MAX_TXNR + 1
        return self._txnr

    # --- the session ---

    def connected(self) -> bool:
        """Whether a session is open (one is tried when due)."""
        if self.sock is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            self.sock = open_connection(self.s)
            self._reader, self._txnr = RelpReader(), 0
            self._open()
        except (OSError, RelpError, _Ended) as exc:
            self._drop()
            if self._backoff <= 0.1:
                log.error(
                    "signerd.forwarding_collector_down host=%s port=%d transport=relp error=%s",
                    self.s.host,
                    self.s.port,
                    _why(exc),
                )
            self._retry_at = now + self._backoff
            self._backoff = min(5.0, self._backoff * 2)
            return False
        self._backoff = 0.1
        log.info(
            "signerd.forwarding_connected host=%s port=%d transport=relp", self.s.host, self.s.port
        )
        return True

    def _open(self) -> None:
        """Send ``open`` and wait (at most ``timeout``) for the collector's ``200``."""
        sock = self.sock
        assert sock is not None
        txnr = self._next_txnr()
        sock.settimeout(self.s.timeout)
        sock.sendall(relp_frame(txnr, b"open", _OFFER))
        deadline = time.monotonic() + self.s.timeout
        while (got := self._reader.take()) is None:
            if time.monotonic() > deadline:
                raise _Ended("no answer to open")
            data = sock.recv(1 << 16)
            if not data:
                raise _Ended("closed before answering open")
            self._reader.feed(data)
        number, command, data = got
        if command != b"rsp" or number != txnr:
            raise RelpError("the answer to open is not its rsp")
        code = answer_code(data)
        offers = data.split(b"\n")[1:]
        commands = {
            c.strip() for o in offers if o.startswith(b"commands=") for c in o[9:].split(b",")
        }
        if code != 200 or b"syslog" not in commands:
            raise _Ended(f"open refused code={code}")
        sock.setblocking(False)

    def ended(self) -> bool | None:
        """Between sends: None while the session is up; else it is closed here (False:
        nothing the collector answered is in doubt)."""
        sock = self.sock
        if sock is None:
            return None
        try:
            self._receive(sock, collections.deque())
        except (OSError, RelpError, _Ended) as exc:
            self._lost(exc, 0, 0)
            return False
        return None

    def disconnect(self) -> None:
        """End the session: ``close`` and its answer (briefly), then the connection."""
        sock = self.sock
        if sock is None:
            return
        with contextlib.suppress(OSError, RelpError, _Ended):
            txnr = self._next_txnr()
            sock.settimeout(1.0)
            sock.sendall(relp_frame(txnr, b"close"))
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                got = self._reader.take()
                if got is not None and got[0] == txnr:
                    break
                if got is None:
                    data = sock.recv(1 << 16)
                    if not data:
                        break
                    self._reader.feed(data)
        self._drop()

    def _drop(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    # --- records ---

    def send(
        self, messages: list[bytes], tick: Callable[[], None] | None = None
    ) -> tuple[int, bool]:
        """Send ``messages`` as ``syslog`` frames; how many of them (from the first) the
        collector answered ``200 OK``, and False (nothing answered is in doubt)."""
        sock = self.sock
        assert sock is not None
        out = bytearray()
        inflight: collections.deque[int] = collections.deque()  # txnrs sent, unanswered
        queued = 0
        progress = time.monotonic()
        while (acked := queued - len(inflight)) < len(messages):
            if tick is not None:
                tick()  # a long send still tells the workers it is alive
            while queued < len(messages) and len(inflight) < WINDOW and len(out) < 1 << 16:
                txnr = self._next_txnr()
                out += relp_frame(txnr, b"syslog", messages[queued])
                inflight.append(txnr)
                queued += 1
            try:
                readable, writable, _ = select.select([sock], [sock] if out else [], [], _POLL)
                if writable and out:
                    with contextlib.suppress(
                        BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError
                    ):
                        del out[: sock.send(out[: 1 << 16])]
                        progress = time.monotonic()
                if (readable or _pending(sock)) and self._receive(sock, inflight):
                    progress = time.monotonic()
            except (OSError, RelpError, _Ended) as exc:
                return self._lost(exc, queued - len(inflight), len(messages)), False
            if time.monotonic() - progress > self.s.timeout:
                log.warning(
                    "signerd.forwarding_collector_stalled host=%s port=%d transport=relp",
                    self.s.host,
                    self.s.port,
                )
                self._drop()
                return acked, False
            if self.stopping.is_set() and time.monotonic() - progress > 1.0:
                self._drop()
                return acked, False
        return acked, False

    def _receive(self, sock: socket.socket, inflight: collections.deque[int]) -> int:
        """Read what the collector sent; the frames of ``inflight`` it answered ``200 OK``
        leave it (from the first), and their count is returned. _Ended when the session is
        over (an end of stream, its ``serverclose``, an error answer): the answers before
        it still count."""
        while True:
            try:
                data = sock.recv(1 << 16)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                break
            if not data:
                self._take(inflight)
                raise _Ended("closed")
            self._reader.feed(data)
            if not _pending(sock):
                break
        return self._take(inflight)

    def _take(self, inflight: collections.deque[int]) -> int:
        answered = 0
        while (got := self._reader.take()) is not None:
            number, command, data = got
            if command == b"serverclose" and number == 0:
                raise _Ended("serverclose")
            if command != b"rsp" or not inflight or number != inflight[0]:
                raise RelpError("an answer to no frame in flight")
            code = answer_code(data)
            if code != 200:
                raise _Ended(f"refused code={code}")
            inflight.popleft()
            answered += 1
        return answered

    def _lost(self, exc: BaseException, acked: int, of: int) -> int:
        log.warning(
            "signerd.forwarding_connection_lost host=%s port=%d transport=relp how=%s acked=%d of=%d",
            self.s.host,
            self.s.port,
            _why(exc),
            acked,
            of,
        )
        self._drop()
        return acked


def _pending(sock: socket.socket) -> int:
    """Bytes TLS already decrypted and holds for ``recv`` (select does not see them)."""
    return sock.pending() if isinstance(sock, ssl.SSLSocket) else 0


def _why(exc: BaseException) -> str:
    if isinstance(exc, _Ended):
        return exc.how
    if isinstance(exc, RelpError):
        return f"protocol ({exc})"
    return getattr(exc, "strerror", None) or type(exc).__name__
