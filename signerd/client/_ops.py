"""Every API call, described once: what to send, and how to read the answer.

An ``Op`` is one call (method, path, body, answer parser, whether it may be
sent twice, whether it carries an ``Idempotency-Key``); both transports of
``_transport`` run the same ``Op`` objects, so ``Client`` and ``AsyncClient``
differ only in how the bytes travel. Arguments are checked before anything is
sent (a malformed key name is ``InvalidKeyName`` without a round trip), and an
answer outside the protocol is ``InternalError``.

The federation calls (``docs/federation.md``) are retry-safe: a resent sign
makes a second envelope (fresh nonce) and the first is never seen; a resent
verify of an envelope the first attempt accepted answers ``replayed_nonce``,
which fails closed. The trusted-key changes are admin calls.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from ..errors import (
    InternalError,
    InvalidKeyName,
    InvalidRequest,
    SignerdError,
    error_for_code,
)
from ..wire import KeyName, decimal_seconds, parse_kid, valid_part
from ._fields import (
    _b64,
    _enc,
    _field,
    _jwk,
    _number,
    _optional,
    _optional_int,
    _optional_str,
    _seconds,
    _state,
)
from ._results import (
    FeedbackEnvelope,
    FeedbackVerified,
    KeyDescription,
    KeyVersion,
    KidInfo,
    RotationDue,
    Signature,
    TelemetrySignature,
    TelemetryVerified,
    VerifyResult,
)

T = TypeVar("T")


@dataclass(frozen=True)
class Op(Generic[T]):
    """One API call: what to send, and how to read a 2xx answer (body, request id)."""

    method: str
    path: str
    body: dict[str, Any] | None
    parse: Callable[[Any, str | None], T]
    retry_safe: bool  # sending it twice changes nothing
    admin: bool = False  # sent with an Idempotency-Key, and again with it when in doubt

    def encoded(self) -> bytes | None:
        return None if self.body is None else json.dumps(self.body).encode()


def decode_answer(status: int, request_id: str | None, body: bytes) -> tuple[Any, str | None]:
    """The JSON body and request id of a 2xx answer; the typed error of an error envelope."""
    try:
        doc = json.loads(body) if body else None
    except ValueError:
        doc = None
    if 200 <= status < 300 and doc is not None:
        return doc, request_id
    if status >= 400 and isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("code"), str):
            message = error.get("message")
            rid = error.get("request_id")
            raise error_for_code(
                error["code"],
                message if isinstance(message, str) else None,
                rid if isinstance(rid, str) else request_id,
            )
    raise InternalError(f"answer outside the protocol (HTTP {status})", request_id=request_id)


# --- answers ---


def _description(doc: Any, _rid: str | None = None) -> KeyDescription:
    active = doc.get("active_kid") if isinstance(doc, dict) else None
    versions = tuple(
        KeyVersion(
            _field(v, "version", int),
            _field(v, "kid", str),
            _state(v),
            _field(v, "created_at", int),
            _optional(v, "thumbprint"),
            _optional(v, "pkcs11_uri"),
            _optional_int(v, "state_changed_at"),
            _optional_int(v, "deletion_at"),
        )
        for v in _field(doc, "versions", list)
    )

    return KeyDescription(
        key=_field(doc, "key", str),
        tenant=_field(doc, "tenant", str),
        name=_field(doc, "name", str),
        active_kid=active if isinstance(active, str) else None,
        versions=versions,
        algorithm=_optional(doc, "algorithm"),
        backend=_optional(doc, "backend"),
        rotation_due=_rotation_due(doc.get("rotation_due")),
        deletion_wait=_number(doc, "deletion_wait"),
    )


def _rotation_due(due: Any) -> RotationDue | None:
    if due is None:
        return None
    age = _number(due, "max_active_age")
    if age is None:
        raise InternalError("answer outside the protocol: field 'max_active_age'")
    return RotationDue(age, _field(due, "at", int), _field(due, "overdue", bool))


def _signature(doc: Any, _rid: str | None = None) -> Signature:
    return Signature(_field(doc, "kid", str), _b64(_field(doc, "signature", str)))


def _batch(doc: Any, request_id: str | None = None) -> list[Signature | SignerdError]:
    out: list[Signature | SignerdError] = []
    for item in _field(doc, "results", list):
        if isinstance(item, dict) and "error" in item:
            err = item["error"]
            out.append(
                error_for_code(_field(err, "code", str), _field(err, "message", str), request_id)
            )
        else:
            out.append(_signature(item))
    return out


def _verify_result(doc: Any, _rid: str | None = None) -> VerifyResult:
    return VerifyResult(_field(doc, "kid", str), _field(doc, "key", str), _state(doc))


def _kid_info(doc: Any, _rid: str | None = None) -> KidInfo:
    jwk = _jwk(doc)
    return KidInfo(
        kid=_field(doc, "kid", str),
        key=_field(doc, "key", str),
        version=_field(doc, "version", int),
        state=_state(doc),
        jwk=jwk,
        pem=_field(doc, "pem", str),
    )


def _jwks(doc: Any, _rid: str | None = None) -> list[dict[str, str]]:
    keys = _field(doc, "keys", list)
    if not all(isinstance(jwk, dict) for jwk in keys):
        raise InternalError("answer outside the protocol: field 'keys'")
    return [{str(k): str(v) for k, v in jwk.items()} for jwk in keys]


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


def _feedback_envelope(doc: Any, _rid: str | None = None) -> FeedbackEnvelope:
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


def _status(doc: Any, _rid: str | None = None) -> str:
    return _field(doc, "status", str)


# --- requests ---


def _key_path(key: str) -> str:
    name = KeyName.parse(key)  # InvalidKeyName before anything is sent
    return f"/v1/keys/{name.tenant}/{name.name}"


def _tenant(tenant: str) -> str:
    if not valid_part(tenant):
        raise InvalidKeyName("tenant must match [a-z0-9][a-z0-9_-]{0,62}")
    return tenant


def _tenant_query(tenant: str | None) -> str:
    return "" if tenant is None else f"?tenant={quote(_tenant(tenant))}"


def op_create(key: str) -> Op[KeyDescription]:
    return Op("POST", "/v1/keys", {"key": key}, _description, False, admin=True)


def op_list(tenant: str | None) -> Op[list[KeyDescription]]:
    def parse(doc: Any, _rid: str | None) -> list[KeyDescription]:
        return [_description(d) for d in _field(doc, "keys", list)]

    return Op("GET", "/v1/keys" + _tenant_query(tenant), None, parse, True)


def op_get_key(key: str) -> Op[KeyDescription]:
    return Op("GET", _key_path(key), None, _description, True)


def op_rotate(key: str, pending: bool) -> Op[tuple[str, KeyDescription]]:
    def parse(doc: Any, _rid: str | None) -> tuple[str, KeyDescription]:
        return _field(doc, "kid", str), _description(_field(doc, "key", dict))

    body = {"pending": True} if pending else {}
    return Op("POST", f"{_key_path(key)}/rotate", body, parse, False, admin=True)


def op_version(key: str, version: int, action: str, body: dict[str, Any]) -> Op[KeyDescription]:
    """promote, retire, destroy or cancel-deletion of one version."""
    path = f"{_key_path(key)}/versions/{int(version)}/{action}"
    return Op("POST", path, body, _description, False, admin=True)


def op_sign(key: str, data: bytes) -> Op[Signature]:
    return Op("POST", "/v1/sign", {"key": key, "data": _enc(data)}, _signature, True)


def op_sign_batch(items: Sequence[tuple[str, bytes]]) -> Op[list[Signature | SignerdError]]:
    body = {"items": [{"key": k, "data": _enc(d)} for k, d in items]}
    return Op("POST", "/v1/sign", body, _batch, True)


def op_verify(kid: str, data: bytes, signature: bytes) -> Op[VerifyResult]:
    body = {"kid": kid, "data": _enc(data), "signature": _enc(signature)}
    return Op("POST", "/v1/verify", body, _verify_result, True)


def op_jwks(tenant: str | None) -> Op[list[dict[str, str]]]:
    return Op("GET", "/v1/jwks" + _tenant_query(tenant), None, _jwks, True)


def op_kid(kid: str) -> Op[KidInfo]:
    parse_kid(kid)  # UnknownKid for a malformed kid, as the daemon answers
    return Op("GET", f"/v1/kids/{kid}", None, _kid_info, True)


def op_status(path: str) -> Op[str]:
    """/v1/health or /v1/ready."""
    return Op("GET", path, None, _status, True)


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
    return Op("POST", "/v1/feedback/sign", body, _feedback_envelope, True)


def op_feedback_verify(
    envelope: FeedbackEnvelope | Mapping[str, Any], schema: str, attestation: str | None = None
) -> Op[FeedbackVerified]:
    wire = envelope.to_json() if isinstance(envelope, FeedbackEnvelope) else dict(envelope)
    req: dict[str, Any] = {"envelope": wire, "schema": schema}
    if attestation is not None:
        req["attestation"] = attestation
    return Op("POST", "/v1/feedback/verify", req, _feedback_verified, True)
