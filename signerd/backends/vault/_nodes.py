"""Which node of an OpenBao / Vault cluster signerd talks to, and failing over.

hvac takes one address; a cluster has several. ``Nodes`` keeps the configured
addresses in order and the one in use, which every request (hvac's and the
sign path's) is sent to. signerd talks to the active node only: a standby
answers transit reads and signs itself from its own copy of the storage,
which lags the leader (right after a rotate, a standby refuses the new
version as "higher than the latest"; right after a create, "signing key not
found"), and the key a daemon returns must be the one that signed.

A request that cannot reach its node, or that the node refuses as sealed or
not ready, calls ``failover``: the addresses are probed in the configured
order (``sys/health``: 200 means active) and the first active node becomes
the one in use. While no node is active (an election) the request fails with
``BackendUnavailable``, which clients see as 503 with ``Retry-After``; probes
are then made at most every ``_PROBE_GAP`` seconds, whatever the request rate.
The node in use is also checked every ``health_interval`` seconds, so that a
leader that stepped down (and now answers as a stale standby) is left.

With one address none of this runs: requests go to it, as they always did.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence

import requests

from ...errors import BackendUnavailable

log = logging.getLogger("signerd.vault")

#: seconds between two scans of the cluster while no node is active
_PROBE_GAP = 0.1
#: seconds a health probe may take (a node that slow is not used)
_PROBE_TIMEOUT = 1.0


class Nodes:
    """The configured addresses, the one in use, and the failover counter."""

    def __init__(
        self, addrs: Sequence[str], *, ca_file: str | None = None, health_interval: float = 1.0
    ) -> None:
        if not addrs:
            raise ValueError("at least one address")
        self.addrs = tuple(addrs)
        self.health_interval = health_interval
        self._index = 0
        #: bumped at every switch; a caller that saw an older one need not probe again
        self.generation = 0
        #: how many times signerd switched to another node (read by metrics)
        self.failovers = 0
        self._lock = threading.Lock()
        self._checked = -math.inf  # the first request checks the first node
        self._failed_scan = -math.inf
        self._session = requests.Session()
        self._session.trust_env = False
        self._session.verify = ca_file or True

    @property
    def clustered(self) -> bool:
        return len(self.addrs) > 1

    @property
    def current(self) -> str:
        """The address requests go to now."""
        return self.addrs[self._index]

    def probe(self, addr: str) -> int | None:
        """``sys/health``'s status for one node (200 active, 429 standby); None unreachable."""
        try:
            answer = self._session.get(f"{addr}/v1/sys/health", timeout=_PROBE_TIMEOUT)
        except requests.RequestException:
            return None
        return answer.status_code

    def failover(self, seen: int) -> None:
        """The node of generation ``seen`` failed: use the first active node.

        Returns at once when another thread switched since ``seen``. Raises
        BackendUnavailable while no node is active.
        """
        if not self.clustered:
            return
        with self._lock:
            if self.generation != seen:
                return
            now = time.monotonic()
            if now - self._failed_scan < _PROBE_GAP:
                raise BackendUnavailable("no active Vault node (election in progress?)")
            for index, addr in enumerate(self.addrs):
                if self.probe(addr) == 200:
                    self._checked = time.monotonic()
                    if index != self._index:
                        self._switch(index)
                    else:
                        self.generation += 1  # same node, fresh connections
                    return
            self._failed_scan = time.monotonic()
            log.warning("signerd.vault.no_active_node nodes=%d", len(self.addrs))
            raise BackendUnavailable("no active Vault node (election in progress?)")

    def check_due(self) -> None:
        """Every ``health_interval``: make sure the node in use is still the active one."""
        if not self.clustered or time.monotonic() - self._checked < self.health_interval:
            return
        first = self._checked == -math.inf
        if not self._lock.acquire(blocking=first):
            return  # another thread is checking or failing over
        try:
            if first and self._checked != -math.inf:
                return  # another thread made the first check meanwhile
            self._checked = time.monotonic()
            seen = self.generation
            active = self.probe(self.current) == 200
        finally:
            self._lock.release()
        if not active:
            log.warning("signerd.vault.node_not_active addr=%s", self.current)
            self.failover(seen)

    def due(self) -> bool:
        """Whether the node in use is due for its health check (``check_due`` would probe)."""
        return self.clustered and time.monotonic() - self._checked >= self.health_interval

    def check_soon(self) -> None:
        """The node in use did not answer: check it at the next ``check_due``."""
        self._checked = min(self._checked, time.monotonic() - self.health_interval)

    def ensure_active(self) -> None:
        """Probe the node in use now (readiness); fail over if it is not active."""
        if not self.clustered:
            return
        seen = self.generation
        if self.probe(self.current) != 200:
            self.failover(seen)
        else:
            self._checked = time.monotonic()

    def _switch(self, index: int) -> None:
        log.warning(
            "signerd.vault.failover from=%s to=%s", self.addrs[self._index], self.addrs[index]
        )
        self._index = index
        self.generation += 1
        self.failovers += 1

    def close(self) -> None:
        self._session.close()
