"""The gateway's aiohttp middleware: mTLS identity first, then signed telemetry through signerd.

For every request, in this order:

1. **mTLS.** The server's ``SSLContext`` requires a client certificate
   (``server_context``); the middleware then checks that the identity the
   caller declares (``ServicePins.header``) is pinned to the SHA-256 of the
   certificate it presented. Any violation answers 401 before the body is
   read.
2. **Envelope.** For requests that carry telemetry (by default every POST),
   the envelope comes from the headers (``TelemetryHeaders``); a missing or
   malformed one answers 401. When ``identity_tenants`` is given, the
   declared tenant must be one the service identity may speak for (403
   ``tenant_mismatch``).
3. **Verification.** The raw body (bounded by ``max_body_bytes``: 413) and
   the envelope go to signerd's ``/v1/telemetry/verify``, which checks kid,
   tenant mapping, signature, timestamp, attestation and nonce in that
   order; its codes map onto the seeds' statuses (``STATUS_FOR_CODE``):
   401, 403, 409, 422, and 503 when verification cannot run.

A verified request reaches the handler with ``request[TELEMETRY]`` (what
signerd accepted) and ``request[SERVICE_IDENTITY]``; ``await request.read()``
returns the verified body. A handler may raise ``Refusal`` to answer in the
same error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..client import AsyncClient, TelemetryVerified
from ..errors import InvalidRequest, SignerdError
from ._headers import MalformedEnvelope, TelemetryHeaders, read_envelope, single
from ._mtls import ServicePins
from ._status import Refusal, refusal_for

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

TELEMETRY: web.RequestKey[TelemetryVerified] = web.RequestKey(
    "signerd.telemetry", TelemetryVerified
)
SERVICE_IDENTITY: web.RequestKey[str] = web.RequestKey("signerd.service_identity", str)


def _posts(request: web.Request) -> bool:
    return request.method == "POST"


@dataclass(frozen=True)
class GatewayPolicy:
    """What the middleware enforces, besides the pins.

    - ``carries_telemetry``: which requests must carry signed telemetry
      (default: every POST); the others pass after the mTLS check.
    - ``attestation``: the attestation hash a request must carry, if any
      (e.g. from the route), passed to signerd as ``attestation``.
    - ``identity_tenants``: tenants each service identity may speak for;
      ``None`` leaves tenant mapping to signerd's kid-to-tenant check alone.
    """

    headers: TelemetryHeaders = field(default_factory=TelemetryHeaders)
    carries_telemetry: Callable[[web.Request], bool] = _posts
    attestation: Callable[[web.Request], str | None] | None = None
    identity_tenants: Mapping[str, frozenset[str]] | None = None
    max_body_bytes: int = 1 << 20
    timeout: float | None = None  # per signerd call; None: the client's default


def gateway_middleware(
    client: AsyncClient, pins: ServicePins, policy: GatewayPolicy | None = None
) -> Middleware:
    """The middleware for ``web.Application(middlewares=[...])``; ``client`` talks to signerd."""
    rules = policy or GatewayPolicy()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            identity = _identity(request, pins)
            request[SERVICE_IDENTITY] = identity
            if rules.carries_telemetry(request):
                request[TELEMETRY] = await _verify(request, identity, client, rules)
            return await handler(request)
        except Refusal as refusal:
            return refusal.response()

    return middleware


def _identity(request: web.Request, pins: ServicePins) -> str:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    try:
        declared = single(request.headers, pins.header)
    except MalformedEnvelope:
        declared = None  # declared twice: no identity
    return pins.check(declared, ssl_object)


async def _verify(
    request: web.Request, identity: str, client: AsyncClient, rules: GatewayPolicy
) -> TelemetryVerified:
    try:
        envelope = read_envelope(request.headers, rules.headers)
    except MalformedEnvelope as exc:
        raise refusal_for(InvalidRequest(str(exc))) from None
    if rules.identity_tenants is not None and envelope.tenant not in rules.identity_tenants.get(
        identity, frozenset()
    ):
        raise Refusal(403, "tenant_mismatch", "service identity may not send for this tenant")
    length = request.content_length
    if length is not None and length > rules.max_body_bytes:
        raise Refusal(413, "payload_too_large", "request body is over the size limit")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Refusal(413, "payload_too_large", "request body is over the size limit") from None
    if len(body) > rules.max_body_bytes:
        raise Refusal(413, "payload_too_large", "request body is over the size limit")
    attestation = rules.attestation(request) if rules.attestation is not None else None
    try:
        return await client.telemetry_verify(
            envelope.tenant,
            envelope.kid,
            envelope.timestamp,
            envelope.nonce,
            body,
            envelope.signature,
            attestation=attestation,
            timeout=rules.timeout,
        )
    except SignerdError as exc:
        raise refusal_for(exc) from None


async def feedback_response(
    client: AsyncClient,
    key: str,
    schema: str,
    data: object,
    *,
    status: int = 200,
    timeout: float | None = None,
) -> web.Response:
    """Sign ``data`` as feedback with ``key`` and answer with the envelope as JSON.

    When signerd cannot sign, raises ``Refusal`` (503, or the mapped status),
    which the middleware turns into the error envelope.
    """
    try:
        envelope = await client.feedback_sign(key, schema, data, timeout=timeout)
    except SignerdError as exc:
        refusal = refusal_for(exc)
        if refusal.status < 500:  # a refusal to sign is the gateway's fault, not the caller's
            refusal = Refusal(503, exc.code, exc.message, exc.request_id)
        raise refusal from None
    return web.json_response(envelope.to_json(), status=status)
