"""mTLS in the gateway middleware: real TLS on 127.0.0.1, certificates made at test start."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from signerd.gateway import GatewayPolicy, ServicePins, client_context, normalise_fingerprint

from ..support.tlsgateway import Pki, StubSignerd, envelope_headers, make_pki, serve

pytestmark = pytest.mark.timeout(60)

NO_TELEMETRY = GatewayPolicy(carries_telemetry=lambda request: False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _get(
    url: str, ctx: ssl.SSLContext, headers: dict[str, str]
) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url + "/ingest", ssl=ctx, headers=headers) as resp,
    ):
        return resp.status, await resp.json()


async def test_pinned_certificate_with_its_identity_passes(pki: Pki) -> None:
    """A certificate pinned for the identity it declares reaches the handler."""
    async with serve(pki, StubSignerd(), NO_TELEMETRY) as url:
        status, doc = await _get(url, pki.client(pki.producer), {"X-Service-Identity": "producer"})
    assert status == 200
    assert doc["identity"] == "producer"


async def test_certificate_of_the_ca_but_not_pinned_is_401(pki: Pki) -> None:
    """A certificate the CA signed but whose fingerprint is not pinned answers 401."""
    async with serve(pki, StubSignerd(), NO_TELEMETRY) as url:
        status, doc = await _get(url, pki.client(pki.rogue), {"X-Service-Identity": "producer"})
    assert status == 401
    assert doc["error"]["code"] == "invalid_client_certificate"


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-Service-Identity": "billing"}, {"X-Service-Identity": "pro ducer"},
     {"X-Service-Identity": "x" * 200}],
    ids=["missing", "unpinned-identity", "malformed", "too-long"],
)  # fmt: skip
async def test_identity_missing_or_unpinned_is_401(pki: Pki, headers: dict[str, str]) -> None:
    """A pinned certificate declaring no identity, another identity, or a malformed one: 401."""
    async with serve(pki, StubSignerd(), NO_TELEMETRY) as url:
        status, doc = await _get(url, pki.client(pki.producer), headers)
    assert status == 401
    assert doc["error"]["code"] == "invalid_client_certificate"
    assert "billing" not in str(doc)


async def test_no_client_certificate_fails_the_handshake(pki: Pki) -> None:
    """Without a client certificate the TLS handshake itself is refused (CERT_REQUIRED)."""
    bare = ssl.create_default_context(cafile=str(pki.ca.cert_path))
    async with serve(pki, StubSignerd(), NO_TELEMETRY) as url:
        with pytest.raises(aiohttp.ClientError):
            await _get(url, bare, {"X-Service-Identity": "producer"})


async def test_certificate_of_another_ca_fails_the_handshake(pki: Pki) -> None:
    """A client certificate from a CA the gateway does not trust is refused in the handshake."""
    stranger = pki.other_ca.issue_client("stranger", "producer")
    ctx = client_context(str(pki.ca.cert_path), str(stranger.cert), str(stranger.key))
    async with serve(pki, StubSignerd(), NO_TELEMETRY) as url:
        with pytest.raises(aiohttp.ClientError):
            await _get(url, ctx, {"X-Service-Identity": "producer"})


def _headers_only(
    port: int, ctx: ssl.SSLContext, headers: dict[str, str], length: int, wait: float = 5.0
) -> bytes:
    """Send a POST's headers announcing ``length`` bytes of body, send no body, read the answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=wait)
    with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        tls.sendall(
            f"POST /ingest HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n"
            f"{head}\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


async def test_refused_before_the_body_is_read(pki: Pki) -> None:
    """A rogue certificate is answered 401 while the announced body has not been sent at all."""
    stub = StubSignerd()
    async with serve(pki, stub) as url:
        port = int(url.rsplit(":", 1)[1])
        answer = await asyncio.to_thread(
            _headers_only, port, pki.client(pki.rogue), envelope_headers(), 1000
        )
    assert answer.startswith(b"HTTP/1.1 401"), answer[:64]
    assert stub.calls == []


async def test_pinned_identity_then_waits_for_the_body(pki: Pki) -> None:
    """The same request from the pinned certificate is not answered before its body arrives."""
    async with serve(pki, StubSignerd()) as url:
        port = int(url.rsplit(":", 1)[1])

        def attempt() -> bytes:
            try:
                return _headers_only(
                    port, pki.client(pki.producer), envelope_headers(), 1000, wait=1.5
                )
            except TimeoutError:
                return b"timeout"

        answer = await asyncio.to_thread(attempt)
    assert answer == b"timeout"


def test_fingerprints_are_normalised_and_checked() -> None:
    """Pins accept colon-separated, prefixed or plain hex, and refuse anything else."""
    plain = "ab" * 32
    assert normalise_fingerprint(":".join(["AB"] * 32)) == plain
    assert normalise_fingerprint("sha256:" + plain.upper()) == plain
    for bad in ["ab" * 31, "zz" * 32, plain + "\n", ""]:
        with pytest.raises(ValueError):
            normalise_fingerprint(bad)
    with pytest.raises(ValueError, match="give a list"):
        ServicePins.from_mapping({"producer": plain})
    with pytest.raises(ValueError, match="not a valid identity"):
        ServicePins.from_mapping({"bad id": [plain]})


def test_pki_fingerprint_is_sha256_of_der(pki: Pki) -> None:
    """The pinned fingerprint is SHA-256 of the certificate's DER, as the middleware computes it."""
    import hashlib

    der = ssl.PEM_cert_to_DER_cert(Path(pki.producer.cert).read_text())
    assert hashlib.sha256(der).hexdigest() == pki.producer.fingerprint
