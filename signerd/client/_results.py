"""What the clients return: frozen dataclasses, one per kind of answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..wire import VersionState, telemetry_input

__all__ = [
    "FeedbackEnvelope",
    "FeedbackVerified",
    "KeyDescription",
    "KeyVersion",
    "KidInfo",
    "RotationDue",
    "Signature",
    "TelemetrySignature",
    "TelemetryVerified",
    "TrustedKey",
    "VerifyResult",
]


# --- keys, signatures ---


@dataclass(frozen=True)
class KeyVersion:
    version: int
    kid: str
    state: VersionState
    created_at: int  # unix seconds
    thumbprint: str | None = None  # RFC 7638 JWK thumbprint of its public key
    pkcs11_uri: str | None = None  # RFC 7512 URI of its private key (keys list/show, PKCS#11)
    state_changed_at: int | None = None  # unix seconds; None: not recorded (older versions)
    deletion_at: int | None = None  # pending_deletion: when the daemon destroys it


@dataclass(frozen=True)
class RotationDue:
    """When a key's active version is due for rotation (``keys.max_active_age``)."""

    max_active_age: float  # seconds
    at: int  # unix seconds
    overdue: bool


@dataclass(frozen=True)
class KeyDescription:
    key: str  # TENANT/NAME
    tenant: str
    name: str
    active_kid: str | None
    versions: tuple[KeyVersion, ...]  # ascending by version
    algorithm: str | None = None  # "Ed25519" (keys list/show)
    backend: str | None = None  # the configured name of its backend (keys list/show)
    rotation_due: RotationDue | None = None  # None: no rule names the key, or no active version
    deletion_wait: float | None = None  # seconds a destroy would wait (keys.deletion_wait)


@dataclass(frozen=True)
class Signature:
    kid: str
    signature: bytes  # 64-byte Ed25519 signature


@dataclass(frozen=True)
class VerifyResult:
    """A signature the daemon found valid: under which kid, of which key, in which state."""

    kid: str
    key: str
    state: VersionState


@dataclass(frozen=True)
class KidInfo:
    """What signerd knows of one kid (any state): its public key as JWK and PEM."""

    kid: str
    key: str
    version: int
    state: VersionState
    jwk: dict[str, str]
    pem: str


# --- federation envelopes (docs/federation.md) ---


@dataclass(frozen=True)
class TelemetrySignature:
    """A signed telemetry body: the signature is over ``f"{timestamp}.{nonce}."`` + body."""

    kid: str
    timestamp: int  # unix seconds
    nonce: str  # unpadded base64url, >= 16 random bytes
    signature: bytes  # 64-byte Ed25519 signature

    def signing_input(self, body: bytes) -> bytes:
        return telemetry_input(str(self.timestamp), self.nonce, body)


@dataclass(frozen=True)
class TelemetryVerified:
    """Telemetry signerd accepted: under which kid, for which tenant, from which key or peer."""

    kid: str
    tenant: str
    source: str = "keyring"  # "keyring" (one of signerd's keys) or "trusted_peer"
    key: str | None = None  # TENANT/NAME when the kid is one of signerd's own
    request_id: str | None = None


@dataclass(frozen=True)
class FeedbackEnvelope:
    """A signed feedback envelope. ``wire`` is the JSON object exactly as signerd sent it."""

    tenant: str
    signed_at: int
    nonce: str
    schema: str
    kid: str
    data: Any
    signature: bytes
    wire: Mapping[str, Any] = field(repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        return dict(self.wire)


@dataclass(frozen=True)
class FeedbackVerified:
    """Feedback signerd accepted."""

    kid: str
    tenant: str
    source: str = "keyring"
    key: str | None = None
    request_id: str | None = None


@dataclass(frozen=True)
class TrustedKey:
    """A trusted peer key: a producer's (or gateway's) public key, valid for one tenant."""

    tenant: str
    kid: str
    state: str  # "active" or "retired"
    source: str  # "config" or "api"
    jwk: dict[str, str]
