"""The client's side of the federation envelopes (``docs/federation.md``): results and requests.

Four calls, run by either transport of ``_http`` like every other ``Op``:
``/v1/telemetry/sign``, ``/v1/telemetry/verify``, ``/v1/feedback/sign`` and
``/v1/feedback/verify``. Signing and verifying are retry-safe: a resent sign
makes a second envelope (fresh nonce) and the first is never seen; a resent
verify of an envelope the first attempt accepted answers ``replayed_nonce``,
which fails closed.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ._http import Op, _b64, _enc, _field
from .errors import InternalError, InvalidRequest

_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,15}")


def decimal_seconds(value: object) -> int:
    """A timestamp as the envelopes carry it (integer, or its decimal text); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("timestamp is not an integer")
    if isinstance(value, int) and 0 <= value < 10**16:
        return value
    if isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        return int(value)
    raise ValueError("timestamp is not a decimal integer of whole seconds")


def _seconds(doc: Any, name: str) -> int:
    value = doc.get(name) if isinstance(doc, dict) else None
    try:
        return decimal_seconds(value)
    except ValueError:
        raise InternalError(f"answer outside the protocol: field {name!r}") from None


def _optional_str(doc: Any, name: str) -> str | None:
    value = doc.get(name) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


# --- results ---


@dataclass(frozen=True)
class TelemetrySignature:
    """A signed telemetry body: the signature is over ``f"{timestamp}.{nonce}."`` + body."""

    kid: str
    timestamp: int  # unix seconds
    nonce: str  # unpadded base64url, >= 16 random bytes
    signature: bytes  # 64-byte Ed25519 signature

    def signing_input(self, body: bytes) -> bytes:
        return f"{self.timestamp}.{self.nonce}.".encode("ascii") + body


@dataclass(frozen=True)
class TelemetryVerified:
    """Telemetry signerd accepted: under which kid, for which tenant, from which key or peer."""

    kid: str
    tenant: str
    key: str | None = None  # TENANT/NAME when the kid is one of signerd's own
    peer: str | None = None  # set when the kid is a trusted peer key
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
    schema: str | None = None
    key: str | None = None
    peer: str | None = None
    request_id: str | None = None


# --- parsing answers ---


def _telemetry_signature(doc: Any, _rid: str | None = None) -> TelemetrySignature:
    return TelemetrySignature(
        kid=_field(doc, "kid", str),
        timestamp=_seconds(doc, "timestamp"),
        nonce=_field(doc, "nonce", str),
        signature=_b64(_field(doc, "signature", str)),
    )


def _telemetry_verified(doc: Any, rid: str | None = None) -> TelemetryVerified:
    return TelemetryVerified(
        kid=_field(doc, "kid", str),
        tenant=_field(doc, "tenant", str),
        key=_optional_str(doc, "key"),
        peer=_optional_str(doc, "peer"),
        request_id=rid,
    )


def feedback_envelope(doc: Any, _rid: str | None = None) -> FeedbackEnvelope:
    """A feedback envelope from its JSON object; InternalError when it is not one."""
    if not isinstance(doc, dict) or "data" not in doc:
        raise InternalError("answer outside the protocol: feedback envelope")
    return FeedbackEnvelope(
        tenant=_field(doc, "tenant", str),
        signed_at=_seconds(doc, "signed_at"),
        nonce=_field(doc, "nonce", str),
        schema=_field(doc, "schema", str),
        kid=_field(doc, "kid", str),
        data=doc["data"],
        signature=_b64(_field(doc, "signature", str)),
        wire=dict(doc),
    )


def _feedback_verified(doc: Any, rid: str | None = None) -> FeedbackVerified:
    return FeedbackVerified(
        kid=_field(doc, "kid", str),
        tenant=_field(doc, "tenant", str),
        schema=_optional_str(doc, "schema"),
        key=_optional_str(doc, "key"),
        peer=_optional_str(doc, "peer"),
        request_id=rid,
    )


# --- requests ---


def op_telemetry_sign(key: str, body: bytes) -> Op[TelemetrySignature]:
    body_json = {"key": key, "body": _enc(body)}
    return Op("POST", "/v1/telemetry/sign", body_json, _telemetry_signature, True)


def op_telemetry_verify(
    tenant: str,
    kid: str,
    timestamp: int | str,
    nonce: str,
    body: bytes,
    signature: bytes,
    attestation: str | None = None,
) -> Op[TelemetryVerified]:
    try:
        seconds = decimal_seconds(timestamp)
    except ValueError:
        raise InvalidRequest("timestamp must be whole unix seconds") from None
    req: dict[str, Any] = {
        "tenant": tenant,
        "kid": kid,
        "timestamp": seconds,
        "nonce": nonce,
        "body": _enc(body),
        "signature": _enc(signature),
    }
    if attestation is not None:
        req["attestation"] = attestation
    return Op("POST", "/v1/telemetry/verify", req, _telemetry_verified, True)


def op_feedback_sign(key: str, schema: str, data: Any) -> Op[FeedbackEnvelope]:
    body = {"key": key, "schema": schema, "data": data}
    return Op("POST", "/v1/feedback/sign", body, feedback_envelope, True)


def op_feedback_verify(
    envelope: FeedbackEnvelope | Mapping[str, Any], schema: str, attestation: str | None = None
) -> Op[FeedbackVerified]:
    wire = envelope.to_json() if isinstance(envelope, FeedbackEnvelope) else dict(envelope)
    req: dict[str, Any] = {"envelope": wire, "schema": schema}
    if attestation is not None:
        req["attestation"] = attestation
    return Op("POST", "/v1/feedback/verify", req, _feedback_verified, True)


def signature_b64(signature: bytes) -> str:
    return base64.b64encode(signature).decode("ascii")
