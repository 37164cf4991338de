"""The gateway middleware's envelope handling: header extraction, status mapping, feedback answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web

from signerd.client import AsyncClient, ConnectionFailed
from signerd.errors import CODES, error_for_code
from signerd.gateway import (
    STATUS_FOR_CODE,
    GatewayPolicy,
    feedback_response,
    gateway_status,
)

from ..support.tlsgateway import (
    NONCE,
    SIGNATURE,
    Pki,
    StubSignerd,
    envelope_headers,
    make_pki,
    serve,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _post(
    pki: Pki, url: str, headers: dict[str, str], body: bytes = b'{"t": 1}', path: str = "/ingest"
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + path, data=body, ssl=pki.client(pki.producer), headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_envelope_and_raw_body_go_to_signerd(pki: Pki) -> None:
    """A verified request reaches the handler; signerd got every header field and the raw body."""
    stub = StubSignerd()
    body = b'{"event": "scan", "n": 1.50}'
    async with serve(pki, stub) as url:
        status, doc = await _post(pki, url, envelope_headers(), body)
    assert status == 200, doc
    assert doc["kid"] == "acme.telemetry.v1"
    assert doc["body"] == body.decode()
    assert stub.calls == [
        {
            "tenant": "acme",
            "kid": "acme.telemetry.v1",
            "timestamp": 1795000000,  # the header's decimal text, parsed
            "nonce": NONCE,
            "body": body,
            "signature": bytes(range(64)),
            "attestation": None,
        }
    ]


@pytest.mark.parametrize(
    "override",
    [
        {"X-Signerd-Tenant": "Acme"},
        {"X-Signerd-Kid": "acme|telemetry"},
        {"X-Signerd-Timestamp": "01795000000"},
        {"X-Signerd-Timestamp": "-1"},
        {"X-Signerd-Nonce": "short"},
        {"X-Signerd-Nonce": NONCE + "."},
        {"X-Signerd-Signature": SIGNATURE[:-2]},
        {"X-Signerd-Signature": SIGNATURE.replace("+", "-")},
        {"X-Signerd-Signature": SIGNATURE[:-3] + "B=="},
    ],
)
async def test_malformed_header_is_401_and_never_reaches_signerd(
    pki: Pki, override: dict[str, str]
) -> None:
    """Each malformed envelope header answers 401 invalid_request; signerd is not asked."""
    stub = StubSignerd()
    async with serve(pki, stub) as url:
        status, doc = await _post(pki, url, envelope_headers(**override))
    assert (status, doc["error"]["code"]) == (401, "invalid_request")
    assert stub.calls == []
    value = next(iter(override.values()))
    assert value not in doc["error"]["message"]


@pytest.mark.parametrize(
    "name",
    ["X-Signerd-Tenant", "X-Signerd-Kid", "X-Signerd-Timestamp", "X-Signerd-Nonce",
     "X-Signerd-Signature"],
)  # fmt: skip
async def test_missing_header_is_401(pki: Pki, name: str) -> None:
    """A POST without one of the envelope headers answers 401; signerd is not asked."""
    stub = StubSignerd()
    headers = envelope_headers()
    del headers[name]
    async with serve(pki, stub) as url:
        status, doc = await _post(pki, url, headers)
    assert (status, doc["error"]["code"]) == (401, "invalid_request")
    assert name in doc["error"]["message"]
    assert stub.calls == []


EXPECTED = {
    "invalid_signature": 401,
    "unknown_kid": 401,
    "stale_timestamp": 401,
    "retired_kid": 401,
    "tenant_mismatch": 403,
    "permission_denied": 403,
    "attestation_mismatch": 403,
    "shared_peer_key": 403,
    "replayed_nonce": 409,
    "schema_mismatch": 422,
    "nonce_store_unavailable": 503,
    "backend_unavailable": 503,
    "audit_unavailable": 503,
    "rate_limited": 503,
    "internal_error": 503,
    "not_found": 503,
}


@pytest.mark.parametrize(("code", "status"), sorted(EXPECTED.items()))
async def test_signerd_codes_map_to_the_seeds_statuses(pki: Pki, code: str, status: int) -> None:
    """signerd's refusal becomes the seeds' status with signerd's code and request id."""
    stub = StubSignerd(error=error_for_code(code, None, "rid-1"))
    async with serve(pki, stub) as url:
        got, doc = await _post(pki, url, envelope_headers())
    assert (got, doc["error"]["code"], doc["error"]["request_id"]) == (status, code, "rid-1")


async def test_signerd_unreachable_is_503(pki: Pki) -> None:
    """When signerd cannot be reached the gateway answers 503 and never lets the request in."""
    stub = StubSignerd(error=ConnectionFailed())
    async with serve(pki, stub) as url:
        status, doc = await _post(pki, url, envelope_headers())
    assert status == 503
    assert "kid" not in doc


def test_every_wire_code_has_a_failing_closed_status() -> None:
    """Every signerd code maps to a refusal status: nothing in the closed set lets a request in."""
    for code in CODES:
        assert gateway_status(code) in {401, 403, 409, 413, 422, 503}, code
    assert set(STATUS_FOR_CODE) <= set(CODES)


async def test_tenant_not_allowed_to_the_identity_is_403(pki: Pki) -> None:
    """With identity_tenants, a service declaring another tenant is refused 403 before signerd."""
    stub = StubSignerd()
    policy = GatewayPolicy(identity_tenants={"producer": frozenset({"acme"})})
    async with serve(pki, stub, policy) as url:
        status, doc = await _post(pki, url, envelope_headers(**{"X-Signerd-Tenant": "globex"}))
        ok, _ = await _post(pki, url, envelope_headers())
    assert (status, doc["error"]["code"]) == (403, "tenant_mismatch")
    assert ok == 200
    assert len(stub.calls) == 1


async def test_body_over_the_limit_is_413_before_signerd(pki: Pki) -> None:
    """A body over max_body_bytes answers 413 and is not sent to signerd."""
    stub = StubSignerd()
    async with serve(pki, stub, GatewayPolicy(max_body_bytes=16)) as url:
        status, doc = await _post(pki, url, envelope_headers(), b"x" * 17)
    assert (status, doc["error"]["code"]) == (413, "payload_too_large")
    assert stub.calls == []


async def test_attestation_from_the_policy_is_passed_to_signerd(pki: Pki) -> None:
    """The policy's attestation hash for the request goes to signerd's verify."""
    stub = StubSignerd()
    wanted = "sha256:" + "ab" * 32
    async with serve(pki, stub, GatewayPolicy(attestation=lambda request: wanted)) as url:
        status, _ = await _post(pki, url, envelope_headers())
    assert status == 200
    assert stub.calls[0]["attestation"] == wanted


def _feedback_route(stub: StubSignerd) -> Callable[[web.Application], None]:
    def routes(app: web.Application) -> None:
        async def feedback(request: web.Request) -> web.Response:
            return await feedback_response(
                cast(AsyncClient, stub), "acme/feedback", "ingest.v1", {"accepted": True}
            )

        app.router.add_post("/feedback", feedback)

    return routes


async def test_feedback_response_answers_the_signed_envelope(pki: Pki) -> None:
    """feedback_response answers with signerd's envelope, unchanged."""
    stub = StubSignerd()
    async with serve(pki, stub, routes=_feedback_route(stub)) as url:
        status, doc = await _post(pki, url, envelope_headers(), path="/feedback")
    assert status == 200
    assert doc["kid"] == "acme.feedback.v1"
    assert doc["data"] == {"accepted": True}
    assert doc["schema"] == "ingest.v1"
    assert stub.calls[-1] == {
        "key": "acme/feedback",
        "schema": "ingest.v1",
        "data": {"accepted": True},
    }


async def test_feedback_that_cannot_be_signed_is_503(pki: Pki) -> None:
    """When signerd refuses to sign feedback (the gateway's own fault), the answer is 503."""
    stub = StubSignerd()
    async with serve(pki, stub, routes=_feedback_route(stub)) as url:
        stub.error = error_for_code("permission_denied")
        status, doc = await _post(pki, url, envelope_headers(), path="/feedback")
    # the telemetry check is refused first by the same stub: 403
    assert (status, doc["error"]["code"]) == (403, "permission_denied")
    async with serve(pki, stub, GatewayPolicy(carries_telemetry=lambda r: False),
                     routes=_feedback_route(stub)) as url:  # fmt: skip
        status, doc = await _post(pki, url, envelope_headers(), path="/feedback")
    assert (status, doc["error"]["code"]) == (503, "permission_denied")


@pytest.mark.parametrize("name", ["X-Signerd-Kid", "X-Signerd-Tenant", "X-Service-Identity"])
async def test_repeated_header_is_401(pki: Pki, name: str) -> None:
    """An envelope or identity header sent twice is ambiguous: 401, signerd is not asked."""
    from multidict import CIMultiDict

    stub = StubSignerd()
    headers = CIMultiDict(envelope_headers())
    headers.add(name, headers[name])
    async with (
        serve(pki, stub) as url,
        aiohttp.ClientSession() as session,
        session.post(
            url + "/ingest", data=b"{}", ssl=pki.client(pki.producer), headers=headers
        ) as resp,
    ):
        status, doc = resp.status, await resp.json()
    assert status == 401
    assert doc["error"]["code"] in {"invalid_request", "invalid_client_certificate"}
    assert stub.calls == []
