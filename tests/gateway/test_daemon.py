"""The gateway middleware in front of a real signerd: a producer's peer key, stale and unknown
envelopes, and signerd going away."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd import AsyncClient
from signerd.wire import b64url, to_jwk

from ..conftest import DaemonProcess, policy_allow_all, start_daemon, unique
from ..support.tlsgateway import Pki, make_pki, serve

pytestmark = pytest.mark.timeout(120)

KID = "spectrastrike-telemetry-1"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def gateway_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path / "gw", policy=policy_allow_all())
    yield d
    d.stop()


def _signed(
    private: Ed25519PrivateKey, tenant: str, body: bytes, ts: int, n: int
) -> dict[str, str]:
    nonce = b64url(n.to_bytes(16, "big"))
    signature = private.sign(f"{ts}.{nonce}.".encode() + body)
    return {
        "X-Service-Identity": "producer",
        "X-Signerd-Tenant": tenant,
        "X-Signerd-Kid": KID,
        "X-Signerd-Timestamp": str(ts),
        "X-Signerd-Nonce": nonce,
        "X-Signerd-Signature": base64.b64encode(signature).decode(),
    }


async def test_peer_telemetry_through_a_real_signerd(
    pki: Pki, gateway_daemon: DaemonProcess
) -> None:
    """Fresh telemetry under a trusted peer key gets in once; stale, unknown-kid and, once signerd
    is gone, every request is refused with the seeds' status."""
    tenant = unique("gd")
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    body = b'{"event": "scan.finished"}'
    now = int(time.time())
    async with AsyncClient(gateway_daemon.socket_path, timeout=5) as signer:
        await signer.trust_key(tenant, KID, to_jwk(KID, raw))
        async with serve(pki, signer) as url, aiohttp.ClientSession() as session:

            async def post(headers: dict[str, str]) -> tuple[int, str]:
                async with session.post(
                    url + "/ingest", data=body, headers=headers, ssl=pki.client(pki.producer)
                ) as resp:
                    doc = await resp.json()
                    return resp.status, doc.get("kid") or doc["error"]["code"]

            fresh = _signed(private, tenant, body, now, 1)
            assert await post(fresh) == (200, KID)
            assert await post(fresh) == (409, "replayed_nonce")
            assert await post(_signed(private, tenant, body, int(time.time()) - 360, 2)) == (
                401,
                "stale_timestamp",
            )
            assert await post(_signed(private, tenant, body, int(time.time()) + 360, 3)) == (
                401,
                "stale_timestamp",
            )
            unknown = {**_signed(private, tenant, body, now, 4), "X-Signerd-Kid": "nobody-1"}
            assert await post(unknown) == (401, "unknown_kid")
            stranger = Ed25519PrivateKey.generate()
            assert await post(_signed(stranger, tenant, body, now, 5)) == (401, "invalid_signature")
            assert await post(_signed(private, tenant, body, now, 5)) == (200, KID)
            gateway_daemon.stop()
            status, _ = await post(_signed(private, tenant, body, now, 6))
            assert status == 503
