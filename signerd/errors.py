"""The closed set of signerd error codes.

Every error that crosses the wire is one of the codes below, with a fixed HTTP
status. The server raises these; the client maps a wire code back to the same
class. Adding a code is a protocol change: update the table in docs/protocol.md
and the OpenAPI document with it (a test checks both).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AttestationMismatch",
    "AuditUnavailable",
    "BackendError",
    "BackendSealed",
    "BackendUnavailable",
    "ConfirmationRequired",
    "DestroyedKid",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidBase64",
    "InvalidKeyName",
    "InvalidRequest",
    "InvalidSignature",
    "InvalidState",
    "KeyExists",
    "MalformedJson",
    "MethodNotAllowed",
    "NonceStoreUnavailable",
    "NotFound",
    "NotSupported",
    "OutcomeUnknown",
    "PayloadTooLarge",
    "PermissionDenied",
    "RateLimited",
    "ReplayedNonce",
    "RetiredKid",
    "SchemaMismatch",
    "SharedPeerKey",
    "SignerdError",
    "StaleTimestamp",
    "TenantMismatch",
    "TooManyConnections",
    "UnknownKey",
    "UnknownKid",
    "UnknownVersion",
    "UnsupportedMediaType",
    "VerificationError",
    "error_for_code",
]


class SignerdError(Exception):
    """Base of every signerd error: a wire code, an HTTP status, a safe message.

    The message is what a caller sees. It never carries backend text, PINs,
    tokens, paths or signed data; causes are logged, not returned.
    """

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False
    default_message: ClassVar[str] = "internal error"

    def __init__(self, message: str | None = None, *, request_id: str | None = None) -> None:
        self.message = message or self.default_message
        self.request_id = request_id
        super().__init__(self.message)

    def to_wire(self, request_id: str) -> dict[str, object]:
        return {"error": {"code": self.code, "message": self.message, "request_id": request_id}}


# --- 4xx: the request is wrong; retrying it unchanged gives the same answer ---


class MalformedJson(SignerdError):
    code = "malformed_json"
    status = 400
    default_message = "request body is not valid JSON"


class InvalidRequest(SignerdError):
    code = "invalid_request"
    status = 400
    default_message = "request does not match the schema"


class InvalidBase64(SignerdError):
    code = "invalid_base64"
    status = 400
    default_message = "field is not valid standard base64"


class InvalidKeyName(SignerdError):
    code = "invalid_key_name"
    status = 400
    default_message = "key names are TENANT/NAME, each [a-z0-9][a-z0-9_-]{0,62}"


class ConfirmationRequired(SignerdError):
    code = "confirmation_required"
    status = 400
    default_message = "destroy needs 'confirm' set to the kid being destroyed"


class VerificationError(SignerdError):
    """Base of the verification failures: the signature must not be trusted."""

    code = "invalid_signature"
    status = 401
    default_message = "signature is not valid"


class InvalidSignature(VerificationError):
    code = "invalid_signature"
    status = 401
    default_message = "signature is not valid for this kid and data"


class UnknownKid(VerificationError):
    code = "unknown_kid"
    status = 401
    default_message = "kid is not known"


class RetiredKid(VerificationError):
    code = "retired_kid"
    status = 401
    default_message = "kid is retired and no longer verifies"


class DestroyedKid(VerificationError):
    code = "destroyed_kid"
    status = 401
    default_message = "kid was destroyed and no longer verifies"


class StaleTimestamp(VerificationError):
    code = "stale_timestamp"
    status = 401
    default_message = "timestamp is outside the allowed clock skew"


class PermissionDenied(SignerdError):
    code = "permission_denied"
    status = 403
    default_message = "caller is not allowed to do this"


class TenantMismatch(SignerdError):
    code = "tenant_mismatch"
    status = 403
    default_message = "the kid does not belong to the envelope's tenant"


class AttestationMismatch(SignerdError):
    code = "attestation_mismatch"
    status = 403
    default_message = "the envelope does not carry the expected attestation hash"


class NotFound(SignerdError):
    code = "not_found"
    status = 404
    default_message = "no such endpoint"


class UnknownKey(SignerdError):
    code = "unknown_key"
    status = 404
    default_message = "key does not exist"


class UnknownVersion(SignerdError):
    code = "unknown_version"
    status = 404
    default_message = "key has no such version"


class MethodNotAllowed(SignerdError):
    code = "method_not_allowed"
    status = 405
    default_message = "method not allowed on this endpoint"


class KeyExists(SignerdError):
    code = "key_exists"
    status = 409
    default_message = "key already exists"


class InvalidState(SignerdError):
    code = "invalid_state"
    status = 409
    default_message = "version is not in a state that allows this"


class ReplayedNonce(SignerdError):
    code = "replayed_nonce"
    status = 409
    default_message = "nonce was already used with this key"


class SharedPeerKey(SignerdError):
    code = "shared_peer_key"
    status = 409
    default_message = (
        "this public key is already trusted for another tenant (federation.allow_shared_keys)"
    )


class PayloadTooLarge(SignerdError):
    code = "payload_too_large"
    status = 413
    default_message = "request body is over the size limit"


class UnsupportedMediaType(SignerdError):
    code = "unsupported_media_type"
    status = 415
    default_message = "request body must be application/json"


class SchemaMismatch(SignerdError):
    code = "schema_mismatch"
    status = 422
    default_message = "envelope schema is not the expected one"


class IdempotencyKeyReused(SignerdError):
    code = "idempotency_key_reused"
    status = 422
    default_message = "this Idempotency-Key was used for another request"


class RateLimited(SignerdError):
    code = "rate_limited"
    status = 429
    retryable = True
    default_message = "caller is over its rate limit"


# --- 5xx: signerd or what it depends on is in trouble ---


class InternalError(SignerdError):
    code = "internal_error"
    status = 500
    default_message = "internal error"


class OutcomeUnknown(SignerdError):
    """An admin operation was under way when its worker stalled, its backend call did not
    answer in time, or its outcome record could not be written: it may or may not have
    taken effect. Not retryable as such (no Retry-After): a retry with the same
    Idempotency-Key answers what happened; without one, read the key first."""

    code = "outcome_unknown"
    status = 500
    default_message = (
        "the operation may or may not have taken effect; retry with the same "
        "Idempotency-Key to learn its outcome"
    )


class NotSupported(SignerdError):
    code = "not_supported"
    status = 501
    default_message = "the configured backend does not support this"


class BackendError(SignerdError):
    code = "backend_error"
    status = 502
    retryable = True
    default_message = "the key backend answered wrongly"


class BackendUnavailable(SignerdError):
    code = "backend_unavailable"
    status = 503
    retryable = True
    default_message = "the key backend is unavailable"


class BackendSealed(BackendUnavailable):
    code = "backend_sealed"
    status = 503
    retryable = True
    default_message = "the key backend is sealed"


class AuditUnavailable(SignerdError):
    code = "audit_unavailable"
    status = 503
    retryable = True
    default_message = "the audit trail cannot be written; operation refused"


class NonceStoreUnavailable(SignerdError):
    code = "nonce_store_unavailable"
    status = 503
    retryable = True
    default_message = "the nonce store is unavailable or full; envelope not accepted"


class TooManyConnections(SignerdError):
    code = "too_many_connections"
    status = 503
    retryable = True
    default_message = "over the connection cap; retry later"


def _all_codes() -> dict[str, type[SignerdError]]:
    table: dict[str, type[SignerdError]] = {}
    stack: list[type[SignerdError]] = [SignerdError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls is SignerdError or cls is VerificationError:
            continue
        table.setdefault(cls.code, cls)
    return table


CODES: dict[str, type[SignerdError]] = _all_codes()


def error_for_code(
    code: str, message: str | None = None, request_id: str | None = None
) -> SignerdError:
    """The exception for a wire code; an unknown code becomes InternalError."""
    cls = CODES.get(code, InternalError)
    return cls(message, request_id=request_id)
