"""What ``GET /metrics`` and ``GET /v1/status`` report besides the counters: one snapshot.

Taken by the worker that answers, from what it holds: its keyring cache (the
same in every worker: a change in one is re-read by the others before its
answer leaves), a health check of each backend, its audit writer, the nonce
store (shared by the workers) and the worker table the supervisor set up.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._config import Config
from ..audit import AuditTrail
from ..backends import Backend
from ..errors import SignerdError
from ..federation import Federation
from ..forwarding import MAX_SILENCE, LagGate
from ..keys import Due, KeyService, rotation_due
from ..workers import WorkerSlot, WorkerTable

__all__ = [
    "VERSION",
    "BackendState",
    "ForwardingState",
    "KeyState",
    "Snapshot",
    "Sources",
    "snapshot",
]

try:
    VERSION = importlib.metadata.version("signerd")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
    VERSION = "unknown"

#: seconds a backend's health check may take for a snapshot
CHECK_TIMEOUT = 2.0


@dataclass
class Sources:
    """The parts of one serving process a snapshot reads."""

    config: Config
    keys: KeyService
    audit: AuditTrail
    federation: Federation
    table: WorkerTable
    #: the backends by configured name (a cluster's node in use, its failovers)
    backends: Mapping[str, Backend] = field(default_factory=dict)
    #: the audit forwarder's shared page, when [forwarding] is configured
    lag: LagGate | None = None


@dataclass(frozen=True)
class BackendState:
    name: str
    type: str
    up: bool
    code: str | None  # the wire code of a failed check
    node: str | None = None  # a cluster backend's node answering now (a configured address)


@dataclass(frozen=True)
class ForwardingState:
    """The audit forwarder as its shared page shows it."""

    lag_bytes: int | None  # trail bytes the collector has not acknowledged (None: not yet looked)
    heartbeat_age: float | None  # seconds since the forwarder last looked (None: not yet)
    refusing: bool  # past its bound (the forwarder's flag): signs are refused under on_lag=refuse
    healthy: bool  # looked within MAX_SILENCE and not past its bound


@dataclass(frozen=True)
class KeyState:
    key: str  # TENANT/NAME, a validated name from the keyring
    backend: str
    active_kid: str | None
    active_created: float | None  # unix seconds
    versions: dict[str, int]  # state -> count
    due: Due | None


@dataclass
class Snapshot:
    now: float
    started: float
    backends: list[BackendState]
    keys: list[KeyState]
    keys_total: int  # keys in the keyring; ``keys`` holds the first max_key_series by name
    audit_queued: int
    audit_healthy: bool
    nonce_store: str
    nonce_entries: int | None  # None: the store cannot count (Redis)
    workers: list[WorkerSlot] = field(default_factory=list)
    forwarding: ForwardingState | None = None

    @property
    def problems(self) -> list[str]:
        """What makes the daemon degraded, in words (names and codes only)."""
        found = [f"backend {b.name} is down ({b.code})" for b in self.backends if not b.up]
        if not self.audit_healthy:
            found.append("the audit writer is stuck or closed")
        if self.forwarding is not None and not self.forwarding.healthy:
            found.append("audit forwarding is past its bound or silent")
        found += [f"key {k.key} has no active version" for k in self.keys if k.active_kid is None]
        found += [
            f"key {k.key} is past its max_active_age"
            for k in self.keys
            if k.due is not None and k.due.overdue
        ]
        return found


async def _check(sources: Sources, name: str) -> BackendState:
    kind = str(sources.config.backends[name].get("type", ""))
    try:
        await sources.keys.check_backend(name, CHECK_TIMEOUT)
    except SignerdError as exc:
        return BackendState(name, kind, False, exc.code, _node(sources, name))
    return BackendState(name, kind, True, None, _node(sources, name))


def _node(sources: Sources, name: str) -> str | None:
    """The node a cluster backend sends requests to now (after the check: the one that answered)."""
    node = getattr(sources.backends.get(name), "node", None)
    return node if isinstance(node, str) else None


def forwarding_state(gate: LagGate) -> ForwardingState:
    """What the forwarder's page says now."""
    age = gate.heartbeat_age()
    refusing = gate.flagged()
    healthy = age is not None and age <= MAX_SILENCE and not refusing
    return ForwardingState(gate.lag(), age, refusing, healthy)


def _nonce_entries(store: Any) -> int | None:
    """The nonces a store that can count them holds (its file is made by its first add: none
    yet is 0); None for a store that cannot count (Redis) or cannot be read now. Blocking."""
    entries, path = getattr(store, "entries", None), getattr(store, "path", None)
    if not callable(entries):
        return None
    if isinstance(path, str) and not os.path.exists(path):
        return 0
    try:
        counted = entries()
    except (OSError, sqlite3.Error):
        return None
    return counted if isinstance(counted, int) else None


async def snapshot(sources: Sources, *, check: bool = True) -> Snapshot:
    """The state now; ``check``: ask each backend (else only what needs no round trip)."""
    config, keys = sources.config, sources.keys
    now = time.time()
    names = list(config.backends)
    backends = list(await asyncio.gather(*(_check(sources, n) for n in names))) if check else []
    infos = keys.cached()
    shown: list[KeyState] = []
    for info in infos[: config.max_key_series]:
        counts: dict[str, int] = {}
        for v in info.versions:
            counts[v.state.value] = counts.get(v.state.value, 0) + 1
        active = info.active
        name = str(info.key)
        shown.append(
            KeyState(
                key=name,
                backend=keys.backend_name(info.key.tenant),
                active_kid=None if active is None else active.kid,
                active_created=None if active is None else float(active.created_at),
                versions=counts,
                due=rotation_due(config.settings, info, now),
            )
        )
    queued, stuck = sources.audit.backlog()
    counted = await asyncio.to_thread(_nonce_entries, sources.federation.store)
    return Snapshot(
        now=now,
        started=sources.table.started,
        backends=backends,
        keys=shown,
        keys_total=len(infos),
        audit_queued=queued,
        audit_healthy=not stuck,
        nonce_store=config.federation.store,
        nonce_entries=counted,
        workers=sources.table.slots(),
        forwarding=None if sources.lag is None else forwarding_state(sources.lag),
    )
