"""The gateway side of the example (VectorVue's role): ingest signed telemetry, answer signed feedback.

Everything security-relevant is in ``signerd.gateway``: the middleware checks
the mTLS pin and has signerd verify the telemetry (signature, kid-to-tenant
mapping, timestamp skew, attestation, nonce) before ``ingest`` runs;
``feedback_response`` has signerd sign the answer.
"""

from __future__ import annotations

import hashlib
import json
import ssl
from collections.abc import Iterable, Mapping

from aiohttp import web

from signerd.client import AsyncClient
from signerd.gateway import (
    TELEMETRY,
    GatewayPolicy,
    ServicePins,
    feedback_response,
    gateway_middleware,
)

FEEDBACK_KEY = "acme/feedback"
FEEDBACK_SCHEMA = "vectorvue.feedback.v1"


def application(
    signer: AsyncClient, pins: Mapping[str, Iterable[str]], attestation: str
) -> web.Application:
    """The gateway: POST /v1/ingest takes telemetry that must carry ``attestation``."""
    policy = GatewayPolicy(attestation=lambda request: attestation)
    app = web.Application(
        middlewares=[gateway_middleware(signer, ServicePins.from_mapping(pins), policy)]
    )

    async def ingest(request: web.Request) -> web.Response:
        accepted = request[TELEMETRY]
        body = await request.read()
        event = json.loads(body)
        feedback = {
            "accepted": True,
            "event": event.get("event"),
            "telemetry_kid": accepted.kid,
            "telemetry_sha256": hashlib.sha256(body).hexdigest(),
            "attestation_measurement_hash": attestation,
        }
        return await feedback_response(signer, FEEDBACK_KEY, FEEDBACK_SCHEMA, feedback)

    app.router.add_post("/v1/ingest", ingest)
    return app


async def serve(app: web.Application, tls: ssl.SSLContext) -> tuple[web.AppRunner, int]:
    """Serve on 127.0.0.1 on a free port; return the runner (to clean up) and the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    return runner, int(runner.addresses[0][1])
