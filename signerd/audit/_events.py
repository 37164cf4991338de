"""What the audit trail records of a call, and the sinks that write it.

The server builds an ``AuditEvent`` for every call it answers; an ``AuditSink``
(the ``AuditTrail``) writes it. Neither ever sees the payload itself, only its
SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..authz import Peer

__all__ = [
    "SECURITY_OUTCOMES",
    "AuditEvent",
    "AuditSink",
    "PendingRecord",
    "QueueingAuditSink",
    "WriteAheadAuditSink",
]

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


class AuditSink(Protocol):
    """Writes one record durably or raises AuditUnavailable within its deadline."""

    async def record(self, event: AuditEvent) -> None: ...


@runtime_checkable
class QueueingAuditSink(AuditSink, Protocol):
    """An audit sink that also takes records nobody waits for (``submit``)."""

    def submit(self, event: AuditEvent) -> bool:
        """Queue a record for the next group write; False when it cannot be taken now."""
        ...


class PendingRecord(Protocol):
    """A record queued ahead of its operation (``WriteAheadAuditSink.ahead``)."""

    async def durable(self) -> None:
        """Return once the record is on disk; AuditUnavailable when it is not, in time."""
        ...


@runtime_checkable
class WriteAheadAuditSink(QueueingAuditSink, Protocol):
    """An audit sink that writes a record ahead of its operation while the caller works."""

    def ahead(self, event: AuditEvent, group: bool = False) -> PendingRecord:
        """Queue ``event`` for the disk now (AuditUnavailable at once when it cannot be).
        ``group``: other records may be queued in this loop turn; they go to the disk together,
        at the end of the turn."""
        ...

    def submit_later(self, event: AuditEvent) -> bool:
        """``submit``, without a write of its own: it joins the next write (soon)."""
        ...
