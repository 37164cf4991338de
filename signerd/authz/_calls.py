"""What the server knows about a call: who made it, what it asks, how it ended.

The server builds these; the policy (``_authz``) judges a ``Call`` and the
audit trail (``_audit``) records an ``AuditEvent``. Neither ever sees the
payload itself, only its SHA-256.
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..wire._names import KeyName


class Operation(enum.StrEnum):
    SIGN = "sign"
    VERIFY = "verify"
    JWKS = "jwks"  # public keys: /v1/jwks, /v1/kids/{kid}
    LIST = "list"  # read key descriptions
    CREATE = "create"
    ROTATE = "rotate"
    PROMOTE = "promote"
    RETIRE = "retire"
    DESTROY = "destroy"
    TRUST = "trust"  # add and retire trusted peer keys (federation)
    HEALTH = "health"  # /v1/health, /v1/ready, /v1/openapi.json: never refused

    @property
    def is_admin(self) -> bool:
        return self in _ADMIN

    @property
    def fails_closed(self) -> bool:
        """Whether an unwritable audit record refuses the operation."""
        return self is Operation.SIGN or self in _ADMIN


_ADMIN = frozenset(
    {
        Operation.CREATE,
        Operation.ROTATE,
        Operation.PROMOTE,
        Operation.RETIRE,
        Operation.DESTROY,
        Operation.TRUST,
    }
)

#: refusals for signature, mapping and replay: security events (journald warning priority)
SECURITY_OUTCOMES = frozenset(
    {
        "invalid_signature",
        "unknown_kid",
        "retired_kid",
        "destroyed_kid",
        "stale_timestamp",
        "permission_denied",
        "tenant_mismatch",
        "attestation_mismatch",
        "replayed_nonce",
        "shared_peer_key",
    }
)


@dataclass(frozen=True)
class Peer:
    """The caller, as the kernel reports it (SO_PEERCRED), never as it claims."""

    pid: int
    uid: int
    gid: int
    unit: str | None = None  # systemd unit from the peer's cgroup, when known
    user: str | None = None
    groups: tuple[int, ...] = ()  # supplementary gids, when known


@dataclass(frozen=True)
class Call:
    peer: Peer
    operation: Operation
    tenant: str | None  # None: the call spans tenants (e.g. list all keys)
    key: KeyName | None = None


@dataclass(frozen=True)
class AuditEvent:
    time: float  # unix seconds
    request_id: str
    peer: Peer
    operation: str
    outcome: str  # "ok" or the error code
    tenant: str | None = None
    key: str | None = None
    kid: str | None = None
    payload_sha256: tuple[str, ...] = ()  # one per signed/verified item
    reason: str | None = None  # safe message for refusals
    status: int = 200
    # batch sign: "INDEX:CODE" of each refused item (the first 8), e.g. ("1:permission_denied",)
    item_codes: tuple[str, ...] = ()

    @property
    def security(self) -> bool:
        """Whether this record is a security event (a signature, mapping or replay refusal)."""
        return self.outcome in SECURITY_OUTCOMES


class Gate(Protocol):
    """Decides whether a call may proceed; raises PermissionDenied or RateLimited.

    A gate that lets a call proceed sets ``GRANTED`` (the request's own context).
    """

    def authorize(self, call: Call) -> None: ...


#: whether the gate let a call of the request being handled proceed: each request runs
#: in its task (its own context), and the front sets this False before its handler runs
GRANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("signerd_granted", default=False)


class AuditSink(Protocol):
    """Writes one record durably or raises AuditUnavailable within its deadline."""

    async def record(self, event: AuditEvent) -> None: ...


@runtime_checkable
class QueueingAuditSink(AuditSink, Protocol):
    """An audit sink that also takes records nobody waits for (``submit``)."""

    def submit(self, event: AuditEvent) -> bool:
        """Queue a record for the next group write; False when it cannot be taken now."""
        ...
