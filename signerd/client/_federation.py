"""The client's side of the federation envelopes (``docs/federation.md``): results and requests.

Four calls, run by either transport of ``_http`` like every other ``Op``:
``/v1/telemetry/sign``, ``/v1/telemetry/verify``, ``/v1/feedback/sign`` and
``/v1/feedback/verify``. Signing and verifying are retry-safe: a resent sign
makes a second envelope (fresh nonce) and the first is never seen; a resent
verify of an envelope the first attempt accepted answers ``replayed_nonce``,
which fails closed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InternalError, InvalidKeyName, InvalidRequest, UnknownKid
from ..wire._names import valid_part
from ._http import Op, _b64, _enc, _field

_PEER_KID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,11}")


def decimal_seconds(value: object) -> int:
    """A timestamp as the envelopes carry it: whole Unix seconds as a decimal string (no sign,
    no leading zero); ValueError otherwise. The string and the integer map one to one."""
    if isinstance(value, str) and _DECIMAL_RE.fullmatch(value):
        return int(value)
    raise ValueError("timestamp is not a decimal string of whole seconds")


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
        source=_field(doc, "source", str),
        key=_optional_str(doc, "key"),
        request_id=rid,
    )


def _trusted_key(doc: Any, _rid: str | None = None) -> TrustedKey:
    jwk = _field(doc, "jwk", dict)
    return TrustedKey(
        tenant=_field(doc, "tenant", str),
        kid=_field(doc, "kid", str),
        state=_field(doc, "state", str),
        source=_field(doc, "source", str),
        jwk={str(k): str(v) for k, v in jwk.items()},
    )


def _trusted_keys(doc: Any, _rid: str | None = None) -> list[TrustedKey]:
    return [_trusted_key(item) for item in _field(doc, "keys", list)]


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
        source=_field(doc, "source", str),
        key=_optional_str(doc, "key"),
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
    text = (
        str(timestamp)
        if isinstance(timestamp, int) and not isinstance(timestamp, bool)
        else timestamp
    )
    try:
        decimal_seconds(text)
    except ValueError:
        raise InvalidRequest("timestamp must be whole unix seconds") from None
    req: dict[str, Any] = {
        "tenant": tenant,
        "kid": kid,
        "timestamp": text,
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


def _tenant_path(tenant: str) -> str:
    if not valid_part(tenant):
        raise InvalidKeyName("tenant must match [a-z0-9][a-z0-9_-]{0,62}")
    return tenant


def op_trust_add(tenant: str, kid: str, jwk: Mapping[str, str]) -> Op[TrustedKey]:
    body = {"tenant": _tenant_path(tenant), "kid": kid, "jwk": dict(jwk)}
    return Op("POST", "/v1/trusted-keys", body, _trusted_key, False, admin=True)


def op_trust_list(tenant: str | None) -> Op[list[TrustedKey]]:
    query = "" if tenant is None else f"?tenant={_tenant_path(tenant)}"
    return Op("GET", "/v1/trusted-keys" + query, None, _trusted_keys, True)


def op_trust_retire(tenant: str, kid: str) -> Op[TrustedKey]:
    if not _PEER_KID_RE.fullmatch(kid) or kid in {".", ".."}:
        raise UnknownKid()
    path = f"/v1/trusted-keys/{_tenant_path(tenant)}/{kid}/retire"
    return Op("POST", path, {}, _trusted_key, False, admin=True)
