"""What the server knows about a call: who made it and what it asks.

The server builds these and the policy (``_policy``) judges a ``Call``; how a
call ended is the audit trail's ``AuditEvent`` (``signerd.audit``).
"""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass
from typing import Protocol

from ..wire import KeyName


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
    METRICS = "metrics"  # GET /metrics: the Prometheus exposition
    STATUS = "status"  # GET /v1/status: backends, keys, audit, nonces, workers
    HEALTH = "health"  # /v1/health, /v1/ready, /v1/openapi.json: never refused

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


class Gate(Protocol):
    """Decides whether a call may proceed; raises PermissionDenied or RateLimited.

    A gate that lets a call proceed sets ``GRANTED`` (the request's own context).
    """

    def authorize(self, call: Call) -> None: ...


#: whether the gate let a call of the request being handled proceed: each request runs
#: in its task (its own context), and the front sets this False before its handler runs
GRANTED: contextvars.ContextVar[bool] = contextvars.ContextVar("signerd_granted", default=False)
