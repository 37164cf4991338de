"""signerd.gateway: the federation's two ends on aiohttp, with signerd doing the cryptography.

Gateway side (the service that receives telemetry)::

    pins = ServicePins.from_mapping({"spectrastrike": ["9f86d0...", ...]})
    app = web.Application(middlewares=[gateway_middleware(signer, pins)])

    async def ingest(request):
        accepted = request[TELEMETRY]        # kid, tenant: what signerd verified
        body = await request.read()          # the verified raw body
        return await feedback_response(signer, "acme/feedback", "ingest.v1", {...})

    web.run_app(app, ssl_context=server_context(cert, key, client_ca))

Producer side (the service that sends telemetry)::

    producer = Producer(signer, "acme/telemetry", keys=StaticKeys({...}))
    headers = await producer.sign_telemetry(body)
    ... POST body with headers over mTLS (client_context) ...
    feedback = await producer.verify_feedback(await resp.read(), schema="ingest.v1")

See ``docs/federation.md`` for the envelopes and the wire contract, and
``docs/clients.md`` for a walkthrough
(``python -m examples.federation`` runs both ends against two daemons).
"""

from ._headers import MalformedEnvelope, TelemetryEnvelope, TelemetryHeaders, read_envelope
from ._middleware import (
    SERVICE_IDENTITY,
    TELEMETRY,
    GatewayPolicy,
    feedback_response,
    gateway_middleware,
)
from ._mtls import ServicePins, client_context, fingerprint, normalise_fingerprint, server_context
from ._nonces import NonceMemory
from ._producer import (
    KeySource,
    Producer,
    SignerdKeys,
    StaticKeys,
    TrustedPeerKeys,
    VerifiedFeedback,
    canonical_data,
    feedback_signing_input,
)
from ._status import STATUS_FOR_CODE, Refusal, gateway_status, refusal_for

__all__ = [
    "SERVICE_IDENTITY",
    "STATUS_FOR_CODE",
    "TELEMETRY",
    "GatewayPolicy",
    "KeySource",
    "MalformedEnvelope",
    "NonceMemory",
    "Producer",
    "Refusal",
    "ServicePins",
    "SignerdKeys",
    "StaticKeys",
    "TelemetryEnvelope",
    "TelemetryHeaders",
    "TrustedPeerKeys",
    "VerifiedFeedback",
    "canonical_data",
    "client_context",
    "feedback_response",
    "feedback_signing_input",
    "fingerprint",
    "gateway_middleware",
    "gateway_status",
    "normalise_fingerprint",
    "read_envelope",
    "refusal_for",
    "server_context",
]
