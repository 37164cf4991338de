"""The pipe between the supervisor and one worker, and the worker's side of it.

Each worker has one ``SOCK_SEQPACKET`` socket pair with the supervisor, so a
packet is one message and never a fragment. A packet is one kind byte and a
short ASCII body:

- ``I`` (worker to supervisor): the worker has initialised its libraries; the
  supervisor may start the next one while this one reads its keys.
- ``R`` (worker to supervisor): the worker serves (its libraries are
  initialised too, if it never said ``I``).
- ``M`` + text (both ways): a notification. A worker sends it to the
  supervisor, which passes it on to every other worker at once.
- ``H`` (worker to supervisor): a heartbeat, sent from the worker's event
  loop once it called ``heartbeat()``; a worker whose loop stops beating
  (a token call that never returns, inside the loop) is killed and replaced.

Notifications are short, printable, validated text (``keyring-changed
acme/feedback``); nothing a caller sent belongs in one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from ._buckets import SharedBuckets

__all__ = ["INITIALISED", "MAX_MESSAGE", "WorkerChannel", "valid_message"]

log = logging.getLogger("signerd.workers")

MAX_MESSAGE = 256
INITIALISED = b"I"
READY = b"R"
MESSAGE = b"M"
HEARTBEAT = b"H"
RECV_BUFFER = MAX_MESSAGE + 2  # one byte more than a packet may have: a longer one shows
_TEXT = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def valid_message(text: str) -> bool:
    """Printable ASCII, no surrounding blanks, at most MAX_MESSAGE characters."""
    return len(text) <= MAX_MESSAGE and _TEXT.fullmatch(text) is not None


def decode(packet: bytes) -> str | None:
    """The text of an ``M`` packet, or None for anything malformed."""
    if packet[:1] != MESSAGE or len(packet) > MAX_MESSAGE + 1:
        return None
    try:
        text = packet[1:].decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if valid_message(text) else None


class WorkerChannel:
    """What a worker gets from its supervisor besides the listening socket.

    ``index`` is the worker's slot (0 .. workers-1; a restarted worker keeps
    its slot, so per-worker files can be named by it). ``config`` is the
    supervisor's configuration at the time of the fork (fresh after a
    reload). ``buckets`` is the rate-limit table every worker shares.
    """

    def __init__(
        self,
        index: int,
        sock: socket.socket,
        config: Any,
        buckets: SharedBuckets | None = None,
    ) -> None:
        self.index = index
        self.config = config
        self.buckets = buckets
        self._sock = sock
        self._callbacks: list[Callable[[str], None]] = []
        self._queues: list[asyncio.Queue[str | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._initialised = False
        self._announced = False
        self._beat: asyncio.TimerHandle | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- to the supervisor ---

    def initialised(self) -> None:
        """Tell the supervisor this worker's libraries are initialised (once, before ``ready``)."""
        if self._initialised or self._announced:
            return
        self._initialised = True
        self._sock.sendall(INITIALISED)

    def ready(self) -> None:
        """Tell the supervisor this worker serves (once)."""
        if self._announced:
            return
        self._announced = True
        self._sock.sendall(READY)

    def heartbeat(self, interval: float = 1.0) -> None:
        """Beat every ``interval`` seconds from the running loop, until the channel closes.

        The supervisor kills a worker whose beats stop for its
        ``heartbeat_timeout``: a loop that no longer turns serves nobody.
        """
        loop = asyncio.get_running_loop()

        def beat() -> None:
            if self._sock.fileno() < 0:
                return
            with contextlib.suppress(OSError):  # a full pipe: the next beat will do
                self._sock.send(HEARTBEAT, socket.MSG_DONTWAIT)
            self._beat = loop.call_later(interval, beat)

        if self._beat is not None:
            self._beat.cancel()
        beat()

    def send(self, text: str) -> bool:
        """Send a notification for every other worker; False when it could not be sent.

        Never blocks: a full pipe (a supervisor that stopped reading) drops
        the message, which only delays what a periodic refresh finds anyway.
        """
        if not valid_message(text):
            raise ValueError("a notification is printable ASCII of at most 256 characters")
        try:
            self._sock.send(MESSAGE + text.encode("ascii"), socket.MSG_DONTWAIT)
        except (BlockingIOError, OSError):
            log.warning("signerd.workers.notify_dropped worker=%d", self.index)
            return False
        return True

    # --- from the supervisor ---

    def on_message(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(text)`` in the running loop for each notification from another worker."""
        self._listen()
        self._callbacks.append(callback)

    async def messages(self) -> AsyncIterator[str]:
        """The notifications from other workers, as they arrive; ends when the supervisor goes."""
        self._listen()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self._queues.append(queue)
        try:
            while True:
                text = await queue.get()
                if text is None:
                    return
                yield text
        finally:
            with contextlib.suppress(ValueError):
                self._queues.remove(queue)

    @property
    def closed(self) -> bool:
        """True once the supervisor's end of the pipe is gone."""
        return self._closed

    def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
        self._loop = None
        self._sock.close()

    def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            raise RuntimeError("the channel is read by another event loop")
        self._loop = loop
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        while True:
            try:
                packet = self._sock.recv(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:
                self._end()
                return
            text = decode(packet)
            if text is None:
                log.warning("signerd.workers.bad_packet worker=%d", self.index)
                continue
            for callback in list(self._callbacks):
                try:
                    callback(text)
                except Exception:
                    log.exception("signerd.workers.callback_failed worker=%d", self.index)
            for queue in self._queues:
                queue.put_nowait(text)

    def _end(self) -> None:
        self._closed = True
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock.fileno())
        for queue in self._queues:
            queue.put_nowait(None)
