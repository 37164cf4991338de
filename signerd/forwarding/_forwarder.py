"""The forwarder: every chain's new records, and signed checkpoints, to the collector.

One loop in its own process (the supervisor starts it): it reads each chain from its
acknowledged position (``_tail``), sends the records as RFC 5424 messages over one
TCP (or TLS) connection with octet-counted framing, and counts a record delivered
once the collector's TCP stack acknowledged its last byte while the connection was
still established (SIOCOUTQ, and the TCP state read after it); then the position is
saved (``_state``). What was not acknowledged is read again and sent on the next
connection: nothing is lost, and nothing acknowledged is sent twice. A collector
that is down or slow never blocks signing: the trail is the buffer. The bound is
``max_lag_bytes`` of trail not yet acknowledged; past it ``on_lag = "refuse"``
sets the flag the workers read (``_gate``) and ``"drop"`` skips the backlog,
logging ``signerd.forwarding_dropped`` at CRITICAL and telling the collector
(MSGID ``gap``) which seqs of which chain it will never get.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import select
import socket
import ssl
import struct
import termios
import threading
import time
from dataclasses import dataclass

from ._checkpoint import Checkpoint, Signer, sign_checkpoint
from ._gate import LagFlag
from ._settings import ForwardingSettings
from ._state import load_state, save_state
from ._syslog import frame, message
from ._tail import ChainTail, Item

__all__ = ["Forwarder"]

log = logging.getLogger("signerd.forwarding")

_BATCH_RECORDS = 512
_BATCH_BYTES = 256 << 10
_POLL = 0.05
_TCP_ESTABLISHED = 1


@dataclass
class _Chain:
    tail: ChainTail
    worker: str
    since_checkpoint: int = 0
    last_checkpoint: float = 0.0
    checkpointed_seq: int = 0


class Forwarder:
    """See the module text. ``chains``: chain name -> (trail path, worker label)."""

    def __init__(
        self,
        settings: ForwardingSettings,
        chains: dict[str, tuple[str, str]],
        flag: LagFlag | None,
        signer: Signer | None,
        kid_hint: str = "",
    ) -> None:
        self.s = settings
        self.flag = flag
        self.signer, self.kid_hint = signer, kid_hint
        saved = load_state(settings.state)
        self.chains = {
            name: _Chain(ChainTail(name, path, saved.get(name)), worker)
            for name, (path, worker) in chains.items()
        }
        self.stopping = threading.Event()
        self.sock: socket.socket | None = None
        self._retry_at = 0.0
        self._backoff = 0.1
        self._notices: list[bytes] = []  # gap messages not yet delivered
        self.lag = 0

    # --- the loop ---

    def run(self) -> None:
        log.info(
            "signerd.forwarding_started collector=%s:%d chains=%d",
            self.s.host,
            self.s.port,
            len(self.chains),
        )
        try:
            while not self.stopping.is_set():
                if not self.step():
                    self.stopping.wait(_POLL)
        finally:
            self._disconnect()
            for c in self.chains.values():
                c.tail.close()

    def step(self) -> bool:
        """One turn: follow the files, check the bound, send what there is; whether
        anything was delivered (else the caller waits a little)."""
        for c in self.chains.values():
            c.tail.follow()
        self.lag = sum(c.tail.lag_bytes() for c in self.chains.values())
        over = self.lag > self.s.max_lag_bytes
        if over and self.s.on_lag == "drop":
            self._drop()
            over = False
        if self.flag is not None:
            self.flag.set(over)
        if not self._connected():
            return False
        items = self._gather()
        notices = list(self._notices)
        checkpoints = self._due_checkpoints(bool(items))
        if not items and not notices and not checkpoints:
            return False
        frames = [frame(n) for n in notices] + [frame(self._message(i)) for i in items]
        frames += [frame(cp) for cp in checkpoints]
        acked = self._send(frames)
        done_notices = min(acked, len(notices))
        del self._notices[:done_notices]
        delivered = items[: max(0, acked - len(notices))]
        for item in delivered:
            chain = self.chains[item.chain]
            chain.tail.commit(item)
            chain.since_checkpoint += 1
        if delivered:
            save_state(self.s.state, {n: c.tail.pos for n, c in self.chains.items()})
        if acked < len(frames):
            for c in self.chains.values():
                c.tail.rewind()
            return False
        return True

    def _gather(self) -> list[Item]:
        items: list[Item] = []
        share = max(1, _BATCH_RECORDS // max(1, len(self.chains)))
        for c in self.chains.values():
            c.tail.rewind()
            items += c.tail.read(share, _BATCH_BYTES // max(1, len(self.chains)))
        return items

    def _message(self, item: Item) -> bytes:
        severity = 4 if item.security or item.status in (401, 403, 429) else 6
        if item.status >= 500:
            severity = 3
        return message(
            severity=severity,
            when=time.time(),
            hostname=self.s.hostname,
            procid=self.chains[item.chain].worker,
            msgid="audit",
            params={"chain": item.chain, "seq": str(item.seq), "rid": item.record_id},
            msg=item.line,
        )

    # --- checkpoints ---

    def _due_checkpoints(self, busy: bool) -> list[bytes]:
        """Signed checkpoints of the chains whose acknowledged head moved, when due."""
        out: list[bytes] = []
        if self.signer is None:
            return out
        now = time.monotonic()
        for name, c in self.chains.items():
            pos = c.tail.pos
            if pos.seq == 0 or pos.seq == c.checkpointed_seq:
                continue
            due = c.since_checkpoint >= self.s.checkpoint_records
            if not due and now - c.last_checkpoint < self.s.checkpoint_interval:
                continue
            cp = Checkpoint(
                name,
                self.s.hostname,
                c.worker,
                pos.seq,
                pos.head,
                pos.first_seq,
                pos.first_hash,
                pos.count,
                time.time(),
            )
            try:
                signed = sign_checkpoint(cp, self.signer, self.kid_hint)
            except Exception as exc:  # the backend is down: try again on the next turn
                log.error(
                    "signerd.forwarding_checkpoint_unsigned chain=%s error=%s",
                    name,
                    type(exc).__name__,
                )
                c.last_checkpoint = now
                continue
            self.kid_hint = json.loads(signed)["kid"]
            c.since_checkpoint, c.last_checkpoint, c.checkpointed_seq = 0, now, pos.seq
            out.append(
                message(
                    severity=5,
                    when=cp.time,
                    hostname=self.s.hostname,
                    procid=c.worker,
                    msgid="checkpoint",
                    params={"chain": name, "seq": str(pos.seq)},
                    msg=signed,
                )
            )
        return out

    # --- the bound ---

    def _drop(self) -> None:
        for name, c in self.chains.items():
            tail = c.tail
            tail.rewind()
            first = last = 0
            while batch := tail.read(_BATCH_RECORDS, _BATCH_BYTES):
                first = first or batch[0].seq
                last = batch[-1].seq
                for item in batch:
                    tail.commit(item)
                tail.follow()
            if not first:
                continue
            log.critical(
                "signerd.forwarding_dropped chain=%s first_seq=%d last_seq=%d detail=the "
                "collector was behind by more than forwarding.max_lag_bytes; these records "
                "stay in the local trail but will not be forwarded",
                name,
                first,
                last,
            )
            gap = {"v": 1, "gap": name, "first_seq": first, "last_seq": last}
            self._notices.append(
                message(
                    severity=2,
                    when=time.time(),
                    hostname=self.s.hostname,
                    procid=c.worker,
                    msgid="gap",
                    params={"chain": name, "seq": str(last)},
                    msg=json.dumps(gap, sort_keys=True, separators=(",", ":")).encode(),
                )
            )
        save_state(self.s.state, {n: c.tail.pos for n, c in self.chains.items()})

    # --- the connection ---

    def _connected(self) -> bool:
        if self.sock is not None:
            return True
        now = time.monotonic()
        if now < self._retry_at:
            return False
        try:
            sock = socket.create_connection((self.s.host, self.s.port), timeout=self.s.timeout)
            if self.s.tls:
                context = ssl.create_default_context(cafile=self.s.tls_ca_file)
                sock = context.wrap_socket(
                    sock, server_hostname=self.s.tls_server_name or self.s.host
                )
        except OSError as exc:
            if self._backoff <= 0.1:
                log.error(
                    "signerd.forwarding_collector_down collector=%s:%d error=%s",
                    self.s.host,
                    self.s.port,
                    exc.strerror or type(exc).__name__,
                )
            self._retry_at = now + self._backoff
            self._backoff = min(5.0, self._backoff * 2)
            return False
        sock.setblocking(False)
        self.sock, self._backoff = sock, 0.1
        log.info("signerd.forwarding_connected collector=%s:%d", self.s.host, self.s.port)
        return True

    def _disconnect(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()

    def _send(self, frames: list[bytes]) -> int:
        """Send ``frames``; how many of them (from the first) the collector acknowledged."""
        sock = self.sock
        assert sock is not None
        ends, total = [], 0
        for f in frames:
            total += len(f)
            ends.append(total)
        data = memoryview(b"".join(frames))
        sent, acked = 0, 0
        progress = time.monotonic()
        tls = isinstance(sock, ssl.SSLSocket)
        while acked < len(frames):
            try:
                if sent < len(data):
                    _, writable, _ = select.select([], [sock], [], _POLL)
                    if writable:
                        with contextlib.suppress(
                            BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError
                        ):
                            sent += sock.send(data[sent : sent + (1 << 16)])
                            progress = time.monotonic()
                else:
                    time.sleep(0.0005)
                unacked = _outq(sock)  # read before the state: a reset empties the queue
                if not _established(sock):
                    raise ConnectionResetError("the collector closed the connection")
            except (OSError, ssl.SSLError) as exc:
                log.warning(
                    "signerd.forwarding_connection_lost collector=%s:%d error=%s acked=%d of=%d",
                    self.s.host,
                    self.s.port,
                    getattr(exc, "strerror", None) or type(exc).__name__,
                    acked,
                    len(frames),
                )
                self._disconnect()
                return acked
            if tls:  # TLS records do not map to our bytes: all of it, once all is acknowledged
                done = len(data) if sent == len(data) and unacked == 0 else 0
            else:
                done = sent - unacked
            while acked < len(frames) and ends[acked] <= done:
                acked += 1
                progress = time.monotonic()
            if time.monotonic() - progress > self.s.timeout:
                log.warning(
                    "signerd.forwarding_collector_stalled collector=%s:%d", self.s.host, self.s.port
                )
                self._disconnect()
                return acked
            if self.stopping.is_set() and time.monotonic() - progress > 1.0:
                self._disconnect()
                return acked
        return acked


def _outq(sock: socket.socket) -> int:
    """Bytes sent on ``sock`` that the peer has not acknowledged yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _established(sock: socket.socket) -> bool:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return info[0] == _TCP_ESTABLISHED
