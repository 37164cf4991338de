"""A producer's nonce memory: bounded, expiring, in-process.

signerd's verify endpoints record nonces in signerd's own store. A producer
that verifies feedback locally (``Producer.verify_feedback``) has no such
store behind it, so replay protection on that side needs a memory of its
own: this one. It is in-process and not durable: a restarted producer
forgets what it saw, so a feedback envelope captured before the restart can
be replayed until its timestamp leaves the skew window. Producers that need
more verify through signerd (``AsyncClient.feedback_verify``), whose stores
are durable and may be shared (Redis) between hosts.

The memory is bounded: when full of nonces that are still live it refuses
(``nonce_store_unavailable``) rather than evict one, since an evicted nonce
could be replayed.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import NonceStoreUnavailable, ReplayedNonce


class NonceMemory:
    """Remember ``(scope, nonce)`` pairs for ``ttl`` seconds, at most ``max_entries`` at once.

    ``ttl`` must cover the whole window in which a timestamp is accepted:
    at least twice the allowed skew (a message signed ``skew`` seconds in the
    future stays acceptable until ``skew`` seconds after its time).
    """

    def __init__(
        self,
        *,
        ttl: float = 600.0,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()  # oldest first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._expiry)

    def _expire(self, now: float) -> None:
        # every entry lives ttl seconds, so insertion order is expiry order
        while self._expiry:
            key, expires = next(iter(self._expiry.items()))
            if expires > now:
                break
            del self._expiry[key]

    def record(self, scope: str, nonce: str) -> None:
        """Record a nonce once: ``replayed_nonce`` when seen within its TTL, or when full
        ``nonce_store_unavailable``."""
        key = (scope, nonce)
        with self._lock:
            now = self._clock()
            self._expire(now)
            if key in self._expiry:
                raise ReplayedNonce()
            if len(self._expiry) >= self.max_entries:
                raise NonceStoreUnavailable("nonce memory is full")
            self._expiry[key] = now + self.ttl
