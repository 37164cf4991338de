"""How the workers learn that forwarding is too far behind: a page of shared memory.

The forwarder maps a 24-byte file in the runtime directory (tmpfs under systemd)
and keeps in it whether signs are refused (byte 0), when it last looked
(CLOCK_MONOTONIC, bytes 8-15) and the forwarding lag in bytes (16-23). Each worker maps the same file read-only;
``GatedSink`` wraps the worker's audit sink and refuses the record of a sign
(so the sign: ``audit_unavailable``, 503, Retry-After) while the flag is set,
before the forwarder first looked at the trail, and while it has been silent for
``max_silence`` seconds (forwarding cannot be vouched for: the lag is unknown).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import time

from ..audit import AuditEvent, PendingRecord, WriteAheadAuditSink
from ..errors import AuditUnavailable

__all__ = ["LAG_PAGE", "MAX_SILENCE", "GatedSink", "LagFlag", "LagGate"]

#: the page's file name in the runtime directory
LAG_PAGE = "forwarding.lag"
#: seconds without the forwarder's heartbeat (once it began) before signs are refused
MAX_SILENCE = 30.0

log = logging.getLogger("signerd.forwarding")

_SIZE = 24
_LAYOUT = struct.Struct("<B7xdQ")  # refusing, heartbeat (CLOCK_MONOTONIC), lag in bytes


class LagFlag:
    """The forwarder's side: sets the flag and the heartbeat."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        try:
            os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)

    @staticmethod
    def reset(path: str) -> None:
        """Before the workers start: no refusal, no heartbeat yet (not a previous run's)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, _SIZE)
        finally:
            os.close(fd)

    def set(self, refuse: bool, lag: int = 0) -> None:
        self._map[:_SIZE] = _LAYOUT.pack(1 if refuse else 0, time.monotonic(), max(0, lag))

    def close(self) -> None:
        self._map.close()


class LagGate:
    """A worker's side: whether signs are refused now (the file mapped on first use)."""

    def __init__(self, path: str, max_silence: float) -> None:
        self.path, self.max_silence = path, max_silence
        self._map: mmap.mmap | None = None
        self._next_try = 0.0

    def refusing(self) -> bool:
        """Signs are refused when the flag is set, and when the forwarder has not started
        yet or has been silent for ``max_silence`` (nothing vouches for forwarding then)."""
        view = self._mapped()
        if view is None:
            return True
        flag, beat, _ = _LAYOUT.unpack(view[:_SIZE])
        return bool(flag or beat == 0 or time.monotonic() - beat > self.max_silence)

    def lag(self) -> int | None:
        """Trail bytes the collector has not acknowledged, as the forwarder last saw them
        (None before it first looked)."""
        view = self._mapped()
        if view is None:
            return None
        _, beat, lag = _LAYOUT.unpack(view[:_SIZE])
        return int(lag) if beat > 0 else None

    def heartbeat_age(self) -> float | None:
        """Seconds since the forwarder last looked at the trail (None before it first did)."""
        view = self._mapped()
        if view is None:
            return None
        _, beat, _ = _LAYOUT.unpack(view[:_SIZE])
        return max(0.0, time.monotonic() - beat) if beat > 0 else None

    def flagged(self) -> bool:
        """Whether the forwarder set the flag: the lag is past its bound."""
        view = self._mapped()
        return view is not None and bool(_LAYOUT.unpack(view[:_SIZE])[0])

    def began(self) -> bool:
        """Whether the forwarder has looked at the trail at least once."""
        view = self._mapped()
        return view is not None and _LAYOUT.unpack(view[:_SIZE])[1] > 0

    def _mapped(self) -> mmap.mmap | None:
        if self._map is None and time.monotonic() >= self._next_try:
            self._next_try = time.monotonic() + 0.1
            with contextlib.suppress(OSError, ValueError):
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
                finally:
                    os.close(fd)
        return self._map


class GatedSink:
    """An audit sink that refuses the records of signs while ``gate`` refuses.

    It wraps a sink that writes ahead, so a sign is refused at its intent record,
    before the token is asked, and the intent's write still overlaps the token call."""

    def __init__(self, sink: WriteAheadAuditSink, gate: LagGate) -> None:
        self.sink, self.gate = sink, gate
        self._complained = 0.0

    def _check(self, event: AuditEvent) -> None:
        """AuditUnavailable for a sign (its intent or its record) while the gate refuses."""
        if event.operation != "sign" or event.outcome not in ("ok", "intent"):
            return
        if not self.gate.refusing():
            return
        now = time.monotonic()
        if now - self._complained > 10.0:
            self._complained = now
            log.error(
                "signerd.forwarding_refusing detail=%s",
                "audit forwarding is behind its bound (or silent); signs are refused until "
                "the collector catches up",
            )
        raise AuditUnavailable("the audit trail is not being forwarded; sign refused")

    async def record(self, event: AuditEvent) -> None:
        self._check(event)
        await self.sink.record(event)

    def submit(self, event: AuditEvent) -> bool:
        return self.sink.submit(event)

    def ahead(self, event: AuditEvent, group: bool = False) -> PendingRecord:
        self._check(event)
        return self.sink.ahead(event, group)

    def submit_later(self, event: AuditEvent) -> bool:
        return self.sink.submit_later(event)
