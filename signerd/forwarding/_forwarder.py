"""The forwarder: every chain's new records, and signed checkpoints, to the collector.

One loop in its own process (the supervisor starts it): it reads each chain from its
acknowledged position (``_tail``), sends the records as RFC 5424 messages over one
connection, and counts a record delivered once the collector acknowledged it; then
the position is saved (``_state``). What was not acknowledged is read again and sent
on the next connection. With ``transport = "relp"`` (``_relp``) the collector itself
answers each message, and nothing else is needed. Over plain TCP (or TLS) with
octet-counted framing (``_collector``) an acknowledgement is its TCP stack's; when
the collector resets the connection (it closed with bytes unread),
what it acknowledged in the last ``REPLAY_WINDOW`` seconds is sent again too: nothing
is lost; copies can only follow a reset, and carry the same chain, seq and record id. A collector
that is down or slow never blocks signing: the trail is the buffer. The bound is
``max_lag_bytes`` of trail not yet acknowledged; past it ``on_lag = "refuse"``
sets the flag the workers read (``_gate``) and ``"drop"`` skips the backlog,
logging ``signerd.forwarding_dropped`` at CRITICAL and telling the collector
(MSGID ``gap``) which seqs of which chain it will never get.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass

from ._checkpoint import Checkpoint, Signer, sign_checkpoint
from ._collector import Collector
from ._gate import LagFlag
from ._relp import RelpCollector
from ._settings import ForwardingSettings
from ._state import Position, load_state, save_state
from ._syslog import message
from ._tail import ChainTail, Item

__all__ = ["Forwarder"]

log = logging.getLogger("signerd.forwarding")

_BATCH_RECORDS = 512
_BATCH_BYTES = 256 << 10
_POLL = 0.05
#: seconds of acknowledged records sent again after the collector reset the connection
REPLAY_WINDOW = 1.0


@dataclass
class _Chain:
    tail: ChainTail
    worker: str
    since_checkpoint: int = 0
    last_checkpoint: float = 0.0
    checkpointed_seq: int = 0
    #: positions before each batch acknowledged on this connection, for ``_replay``
    replay: collections.deque[tuple[float, Position]] = dataclasses.field(
        default_factory=collections.deque
    )


class Forwarder:
    """See the module text. ``chains``: chain name -> (trail path, worker label)."""

    def __init__(
        self,
        settings: ForwardingSettings,
        chains: dict[str, tuple[str, str]],
        flag: LagFlag | None,
        signer: Signer | None,
        kid_hint: str = "",
        replay_window: float = REPLAY_WINDOW,
    ) -> None:
        self.s = settings
        self.replay_window = replay_window
        self.flag = flag
        self.signer, self.kid_hint = signer, kid_hint
        saved = load_state(settings.state)
        self.chains = {
            name: _Chain(ChainTail(name, path, saved.get(name)), worker)
            for name, (path, worker) in chains.items()
        }
        self.stopping = threading.Event()
        self.collector: Collector | RelpCollector = (
            RelpCollector(settings, self.stopping)
            if settings.transport == "relp"
            else Collector(settings, self.stopping)
        )
        self._replay_of: object = None
        self._notices: list[bytes] = []  # gap messages not yet delivered
        self.lag = 0
        self._over = False

    # --- the loop ---

    def run(self) -> None:
        log.info(
            "signerd.forwarding_started host=%s port=%d transport=%s chains=%d",
            self.s.host,
            self.s.port,
            self.s.transport,
            len(self.chains),
        )
        try:
            while not self.stopping.is_set():
                if not self.step():
                    self.stopping.wait(_POLL)
        finally:
            self.collector.disconnect()
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
            self.lag = sum(c.tail.lag_bytes() for c in self.chains.values())
            over = False
        self._over = over
        if self.flag is not None:
            self.flag.set(over, self.lag)
        if self.collector.ended():  # a reset while idle: what it had may be lost there
            self._replay()
            save_state(self.s.state, {n: c.tail.pos for n, c in self.chains.items()})
        if not self.collector.connected():
            return False
        if self.collector.sock is not self._replay_of:  # a new connection: nothing to replay
            self._replay_of = self.collector.sock
            for c in self.chains.values():
                c.replay.clear()
        items = self._gather()
        notices = list(self._notices)
        checkpoints = self._due_checkpoints()
        if not items and not notices and not checkpoints:
            return False
        frames = notices + [self._message(i) for i in items] + [cp for _, cp in checkpoints]
        acked, reset = self.collector.send(frames, self._beat)
        done_notices = min(acked, len(notices))
        del self._notices[:done_notices]
        delivered = items[: max(0, acked - len(notices))]
        now = time.monotonic()
        for item in delivered:
            chain = self.chains[item.chain]
            if not chain.replay or chain.replay[-1][0] < now:
                chain.replay.append((now, dataclasses.replace(chain.tail.pos)))
            chain.tail.commit(item)
            chain.since_checkpoint += 1
        if acked < len(frames):
            for name, _ in checkpoints[max(0, acked - len(notices) - len(items)) :]:
                self.chains[name].checkpointed_seq = 0  # made again next turn
            if reset:
                self._replay()
        if delivered or reset:
            save_state(self.s.state, {n: c.tail.pos for n, c in self.chains.items()})
        if acked < len(frames):
            for c in self.chains.values():
                c.tail.rewind()
            return False
        return True

    def _beat(self) -> None:
        if self.flag is not None:
            self.flag.set(self._over, self.lag)

    def _replay(self) -> None:
        """The collector reset the connection (it closed with bytes unread): what its TCP
        stack acknowledged in the last ``replay_window`` seconds may never have reached it,
        so it is sent again (copies carry the same chain, seq and record id)."""
        since = time.monotonic() - self.replay_window
        for name, c in self.chains.items():
            older = [pos for when, pos in c.replay if when >= since]
            c.replay.clear()
            if not older:
                continue
            back = older[0]
            pos = c.tail.pos
            if (back.dev, back.ino) != (pos.dev, pos.ino) or back.seq >= pos.seq:
                continue
            log.warning(
                "signerd.forwarding_replay chain=%s from_seq=%d to_seq=%d detail=%s",
                name,
                back.seq + 1,
                pos.seq,
                "the collector reset the connection; records it acknowledged just before may be lost there and are sent again",
            )
            c.tail.pos = dataclasses.replace(back)
            c.tail.rewind()

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

    def _due_checkpoints(self) -> list[tuple[str, bytes]]:
        """Signed checkpoints (chain, message) of the chains whose acknowledged head
        moved, when due."""
        out: list[tuple[str, bytes]] = []
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
                (
                    name,
                    message(
                        severity=5,
                        when=cp.time,
                        hostname=self.s.hostname,
                        procid=c.worker,
                        msgid="checkpoint",
                        params={"chain": name, "seq": str(pos.seq)},
                        msg=signed,
                    ),
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
                "signerd.forwarding_dropped chain=%s first_seq=%d last_seq=%d detail=%s",
                name,
                first,
                last,
                "the collector was behind by more than forwarding.max_lag_bytes; these records stay in the local trail but will not be forwarded",
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
