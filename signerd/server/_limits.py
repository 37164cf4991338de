"""What one caller may hold of the server (``Limits``), and a log line counter (``Throttled``).

A leaf: the configuration reads the ``[server]`` table into ``Limits``
without importing the connection state machine.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

__all__ = ["Limits", "Throttled"]

log = logging.getLogger("signerd.server")


@dataclass(frozen=True)
class Limits:
    """What one caller may hold of the server; the ``[server]`` section sets them."""

    max_body_bytes: int = 1 << 20
    max_batch_items: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    max_connections: int = 1024
    max_connections_per_uid: int = 128
    max_connections_stranger: int = 4  # per uid, for callers no rule names
    max_connections_strangers: int = 64  # all of them together (at most half the total)
    log_interval: float = 10.0


class Throttled:
    """A counter that logs at most one line per interval (with the count since the last one)."""

    def __init__(self, event: str, interval: float, level: int = logging.WARNING) -> None:
        self.event, self.interval, self.level = event, interval, level
        self.total = 0
        self._pending = 0
        self._last = -1e18

    def note(self, **fields: object) -> None:
        self.total += 1
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            extra = "".join(f" {k}=%s" for k in fields)  # values quoted by the log formatter
            log.log(
                self.level,
                f"{self.event} count=%d total=%d{extra}",
                self._pending,
                self.total,
                *fields.values(),
            )
            self._pending, self._last = 0, now
