"""The clients' envelope and trusted-key calls, and the producer's local checks, against a real daemon."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd import AsyncClient, Client
from signerd.errors import (
    InvalidRequest,
    InvalidSignature,
    ReplayedNonce,
    RetiredKid,
    SchemaMismatch,
    SignerdError,
    TenantMismatch,
)
from signerd.gateway import (
    Producer,
    SignerdKeys,
    TrustedPeerKeys,
    canonical_data,
    feedback_signing_input,
)
from signerd.wire import b64url, to_jwk

from ..conftest import DaemonProcess, policy_allow_all, start_daemon, unique

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon whose policy also grants managing trusted peer keys."""
    d = start_daemon(tmp_path_factory.mktemp("fed"), policy=policy_allow_all())
    yield d
    assert d.stop() == 0, d.log_text()


def test_telemetry_round_trip_and_replay(fed_daemon: DaemonProcess) -> None:
    """Sync: a signed body verifies once (source keyring); the same envelope again is replayed."""
    tenant = unique("tc")
    with Client(fed_daemon.socket_path) as signer:
        signer.create_key(f"{tenant}/telemetry")
        body = b'{"event": "x"}'
        sig = signer.telemetry_sign(f"{tenant}/telemetry", body)
        assert sig.kid == f"{tenant}.telemetry.v1"
        signer.verify_local(sig.kid, sig.signing_input(body), sig.signature)
        ok = signer.telemetry_verify(tenant, sig.kid, sig.timestamp, sig.nonce, body, sig.signature)
        assert (ok.kid, ok.tenant, ok.source, ok.key) == (
            sig.kid,
            tenant,
            "keyring",
            f"{tenant}/telemetry",
        )
        with pytest.raises(ReplayedNonce):
            signer.telemetry_verify(tenant, sig.kid, sig.timestamp, sig.nonce, body, sig.signature)
        with pytest.raises(InvalidRequest):
            signer.telemetry_verify(tenant, sig.kid, "01", sig.nonce, body, sig.signature)


async def test_feedback_local_and_daemon_checks_agree(fed_daemon: DaemonProcess) -> None:
    """Async: feedback signerd signed verifies locally by kid and at the daemon, each once."""
    tenant = unique("fc")
    async with AsyncClient(fed_daemon.socket_path) as signer:
        await signer.create_key(f"{tenant}/feedback")
        env = await signer.feedback_sign(f"{tenant}/feedback", "s.v1", {"b": [1.0, -0.0], "a": 1})
        assert env.tenant == tenant and env.data == {"b": [1.0, -0.0], "a": 1}
        producer = Producer(signer, f"{tenant}/telemetry", keys=SignerdKeys(signer))
        with pytest.raises(SchemaMismatch):
            await producer.verify_feedback(env.to_json(), schema="s.v2")
        got = await producer.verify_feedback(env.to_json(), schema="s.v1")
        assert got.kid == f"{tenant}.feedback.v1"
        with pytest.raises(SchemaMismatch):
            await signer.feedback_verify(env, "s.v2")
        ok = await signer.feedback_verify(env, "s.v1")
        assert (ok.kid, ok.source) == (env.kid, "keyring")
        with pytest.raises(ReplayedNonce):
            await signer.feedback_verify(env, "s.v1")
        with pytest.raises(ReplayedNonce):
            await producer.verify_feedback(env.to_json(), schema="s.v1")


def _peer_envelope(
    private: Ed25519PrivateKey, tenant: str, kid: str, signed_at: int
) -> dict[str, Any]:
    nonce = b64url(bytes(range(16)) + signed_at.to_bytes(8, "big"))
    data = {"accepted": True}
    message = feedback_signing_input(tenant, signed_at, nonce, "peer.v1", kid, canonical_data(data))
    return {
        "tenant": tenant,
        "signed_at": str(signed_at),
        "nonce": nonce,
        "schema": "peer.v1",
        "kid": kid,
        "data": data,
        "signature": base64.b64encode(private.sign(message)).decode(),
    }


async def test_trusted_peer_key_verifies_locally_until_retired(fed_daemon: DaemonProcess) -> None:
    """A peer key trusted through the client verifies feedback locally and at the daemon;
    retired, it stops verifying at both."""
    tenant, kid = unique("pk"), "peer-feedback:2026"
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    async with AsyncClient(fed_daemon.socket_path, jwks_ttl=0.2, jwks_refetch_interval=0) as signer:
        added = await signer.trust_key(tenant, kid, to_jwk(kid, raw))
        assert (added.tenant, added.kid, added.state) == (tenant, kid, "active")
        assert [k.kid for k in await signer.trusted_keys(tenant)] == [kid]
        producer = Producer(signer, f"{tenant}/telemetry")  # default: TrustedPeerKeys
        assert isinstance(producer.keys, TrustedPeerKeys)
        now = int(time.time())
        env = _peer_envelope(private, tenant, kid, now)
        assert (await producer.verify_feedback(env, schema="peer.v1")).kid == kid
        env2 = _peer_envelope(private, tenant, kid, now + 1)
        assert (await signer.feedback_verify(env2, "peer.v1")).source == "trusted_peer"
        forged = {**_peer_envelope(private, tenant, kid, now + 2), "data": {"accepted": False}}
        with pytest.raises(InvalidSignature):
            await producer.verify_feedback(forged, schema="peer.v1")
        other = Producer(signer, f"{unique('pk')}/telemetry")
        with pytest.raises(SignerdError) as info:
            await other.verify_feedback(
                _peer_envelope(private, tenant, kid, now + 3), schema="peer.v1"
            )
        assert info.value.code in {"unknown_kid", "tenant_mismatch"}
        retired = await signer.retire_trusted_key(tenant, kid)
        assert retired.state == "retired"
        await asyncio.sleep(0.3)
        with pytest.raises(SignerdError) as info:
            await producer.verify_feedback(
                _peer_envelope(private, tenant, kid, now + 4), schema="peer.v1"
            )
        assert info.value.code == "unknown_kid"
        with pytest.raises(RetiredKid):
            await signer.feedback_verify(_peer_envelope(private, tenant, kid, now + 5), "peer.v1")


async def test_peer_kid_of_another_tenant_is_tenant_mismatch(fed_daemon: DaemonProcess) -> None:
    """Telemetry under a peer kid declared for another tenant is tenant_mismatch at the daemon."""
    tenant, kid = unique("pt"), "producer-1"
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    async with AsyncClient(fed_daemon.socket_path) as signer:
        await signer.trust_key(tenant, kid, to_jwk(kid, raw))
        ts, nonce, body = str(int(time.time())), b64url(b"n" * 16), b"{}"
        sig = private.sign(f"{ts}.{nonce}.".encode() + body)
        with pytest.raises(TenantMismatch):
            await signer.telemetry_verify(unique("pt"), kid, ts, nonce, body, sig)
        ok = await signer.telemetry_verify(tenant, kid, ts, nonce, body, sig)
        assert (ok.source, ok.key) == ("trusted_peer", None)
