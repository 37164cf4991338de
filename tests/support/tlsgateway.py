"""A TLS gateway on 127.0.0.1 for the gateway tests: certificates made at start, a stub signerd."""

from __future__ import annotations

import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from examples.federation.certs import CertificateAuthority, Issued
from signerd.client import FeedbackEnvelope, TelemetryVerified
from signerd.gateway import (
    GatewayPolicy,
    ServicePins,
    client_context,
    gateway_middleware,
    server_context,
)

SIGNATURE = base64.b64encode(bytes(range(64))).decode()
NONCE = "AAECAwQFBgcICQoLDA0ODw"  # 16 bytes, unpadded base64url


def envelope_headers(**override: str) -> dict[str, str]:
    headers = {
        "X-Service-Identity": "producer",
        "X-Signerd-Tenant": "acme",
        "X-Signerd-Kid": "acme.telemetry.v1",
        "X-Signerd-Timestamp": "1795000000",
        "X-Signerd-Nonce": NONCE,
        "X-Signerd-Signature": SIGNATURE,
    }
    headers.update(override)
    return headers


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    server: Issued
    producer: Issued  # pinned for "producer"
    rogue: Issued  # signed by the same CA, pinned for nobody
    other_ca: CertificateAuthority  # a CA the gateway does not trust

    def pins(self) -> ServicePins:
        return ServicePins.from_mapping({"producer": [self.producer.fingerprint]})

    def client(self, who: Issued) -> ssl.SSLContext:
        return client_context(str(self.ca.cert_path), str(who.cert), str(who.key))


def make_pki(base: Path) -> Pki:
    ca = CertificateAuthority(base / "ca")
    other = CertificateAuthority(base / "other", "an untrusted CA")
    return Pki(
        ca,
        ca.issue_server(),
        ca.issue_client("producer", "producer"),
        ca.issue_client("rogue", "producer"),
        other,
    )


@dataclass
class StubSignerd:
    """Answers like signerd's envelope endpoints; records what it was asked."""

    error: Exception | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def telemetry_verify(self, tenant: str, kid: str, timestamp: int, nonce: str,
                               body: bytes, signature: bytes, *, attestation: str | None = None,
                               timeout: float | None = None) -> TelemetryVerified:  # fmt: skip
        self.calls.append(
            {"tenant": tenant, "kid": kid, "timestamp": timestamp, "nonce": nonce,
             "body": body, "signature": signature, "attestation": attestation}
        )  # fmt: skip
        if self.error is not None:
            raise self.error
        return TelemetryVerified(kid=kid, tenant=tenant, source="trusted_peer")

    async def feedback_sign(self, key: str, schema: str, data: Any, *,
                            timeout: float | None = None) -> FeedbackEnvelope:  # fmt: skip
        self.calls.append({"key": key, "schema": schema, "data": data})
        if self.error is not None:
            raise self.error
        wire = {"tenant": "acme", "signed_at": "1795000000", "nonce": NONCE, "schema": schema,
                "kid": "acme.feedback.v1", "data": data, "signature": SIGNATURE}  # fmt: skip
        return FeedbackEnvelope("acme", 1795000000, NONCE, schema, "acme.feedback.v1", data,
                                bytes(range(64)), wire)  # fmt: skip


@contextlib.asynccontextmanager
async def serve(
    pki: Pki,
    signer: Any,
    policy: GatewayPolicy | None = None,
    routes: Callable[[web.Application], None] | None = None,
) -> AsyncIterator[str]:
    """Run a gateway with the middleware on 127.0.0.1; yield its base URL."""
    app = web.Application(middlewares=[gateway_middleware(signer, pki.pins(), policy)])

    async def ingest(request: web.Request) -> web.Response:
        from signerd.gateway import SERVICE_IDENTITY, TELEMETRY

        body = await request.read()
        accepted = request.get(TELEMETRY)
        return web.json_response(
            {
                "identity": request[SERVICE_IDENTITY],
                "kid": accepted.kid if accepted else None,
                "body": body.decode(errors="replace"),
            }
        )

    app.router.add_route("*", "/ingest", ingest)
    if routes is not None:
        routes(app)
    ctx = server_context(str(pki.server.cert), str(pki.server.key), str(pki.ca.cert_path))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
