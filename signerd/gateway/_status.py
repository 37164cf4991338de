"""How a gateway answers: signerd's verification codes mapped to the seeds' HTTP statuses.

The federation seeds fix the statuses a gateway answers with: a signature
that does not verify (or cannot be read) 401, a mapping violation 403, a
replay 409, a schema mismatch 422. signerd's codes map onto them one to one
where they exist; what is left means either that the envelope could not
even be parsed (401: the request is not authenticated) or that verification
could not run (503: signerd, its token or its nonce store is unavailable, or
signerd does not speak the envelope protocol). Verification fails closed:
nothing outside this table lets a request through.
"""

from __future__ import annotations

from aiohttp import web

from ..errors import SignerdError

#: signerd wire code -> the status a gateway answers with
STATUS_FOR_CODE: dict[str, int] = {
    "invalid_signature": 401,
    "unknown_kid": 401,
    "retired_kid": 401,
    "destroyed_kid": 401,
    "stale_timestamp": 401,
    "tenant_mismatch": 403,
    "permission_denied": 403,
    "attestation_mismatch": 403,
    "shared_peer_key": 403,  # the kid's key is trusted for several tenants: no mapping holds
    "replayed_nonce": 409,
    "schema_mismatch": 422,
    "payload_too_large": 413,
    # a malformed envelope field: the request is not authenticated
    "invalid_request": 401,
    "invalid_base64": 401,
    "malformed_json": 401,
    "invalid_key_name": 401,
}


class Refusal(Exception):
    """A gateway's refusal: the HTTP status, a code, a safe message, signerd's request id."""

    def __init__(self, status: int, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.request_id = request_id

    def response(self) -> web.Response:
        error: dict[str, str] = {"code": self.code, "message": self.message}
        if self.request_id is not None:
            error["request_id"] = self.request_id
        return web.json_response({"error": error}, status=self.status)


def gateway_status(code: str) -> int:
    """The status for a signerd code; 503 (verification could not run) for any other."""
    return STATUS_FOR_CODE.get(code, 503)


def refusal_for(exc: SignerdError) -> Refusal:
    """signerd's error as the gateway's answer (its code and message are safe to pass on)."""
    return Refusal(gateway_status(exc.code), exc.code, exc.message, exc.request_id)
