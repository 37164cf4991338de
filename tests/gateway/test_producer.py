"""The producer's local feedback verification and its nonce memory (no daemon: keys in-process)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd.errors import SignerdError
from signerd.gateway import (
    NonceMemory,
    Producer,
    StaticKeys,
    canonical_data,
    feedback_signing_input,
)
from signerd.wire import b64url, to_jwk

NOW = 1_795_000_000
NOW_S = str(NOW)
KID = "acme.feedback.v1"
NONCE = "AAECAwQFBgcICQoLDA0ODw"
ATTEST = "sha256:" + "0f" * 32
DEEP: Any = 1
for _ in range(40):
    DEEP = [DEEP]
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


def _keys() -> tuple[Ed25519PrivateKey, StaticKeys]:
    private = Ed25519PrivateKey.from_private_bytes(SEED)  # RFC 8032 test key 1
    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return private, StaticKeys(
        {"acme": [to_jwk(KID, raw)], "globex": [to_jwk("globex.feedback.v1", other)]}
    )


def envelope(private: Ed25519PrivateKey, **override: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "tenant": "acme",
        "signed_at": NOW_S,
        "nonce": NONCE,
        "schema": "ingest.v1",
        "kid": KID,
        "data": {"accepted": True, "score": 0.5, "attestation_measurement_hash": ATTEST},
    }
    signed = {**env, **override.pop("signed_as", {})}
    data = feedback_signing_input(
        signed["tenant"], signed["signed_at"], signed["nonce"], signed["schema"], signed["kid"],
        canonical_data(signed["data"]),
    )  # fmt: skip
    import base64

    env["signature"] = base64.b64encode(private.sign(data)).decode()
    env.update(override)
    return env


def producer(keys: StaticKeys, clock: float = NOW, **kw: Any) -> Producer:
    return Producer(None, "acme/telemetry", keys=keys, clock=lambda: clock, **kw)  # type: ignore[arg-type]


async def _code(p: Producer, env: Any, **kw: Any) -> str:
    with pytest.raises(SignerdError) as info:
        await p.verify_feedback(env, **{"schema": "ingest.v1", **kw})
    return info.value.code


async def test_genuine_feedback_is_accepted_once() -> None:
    """Genuine feedback verifies by kid; the same envelope again is replayed_nonce."""
    private, keys = _keys()
    p = producer(keys)
    env = envelope(private)
    got = await p.verify_feedback(json.dumps(env).encode(), schema="ingest.v1", attestation=ATTEST)
    assert (got.kid, got.tenant, got.data["accepted"]) == (KID, "acme", True)
    assert await _code(p, env) == "replayed_nonce"


@pytest.mark.parametrize(
    ("override", "kw", "code"),
    [
        ({"kid": "acme.feedback.v9"}, {}, "unknown_kid"),
        ({"kid": "globex.feedback.v1"}, {}, "tenant_mismatch"),
        ({"tenant": "globex", "signed_as": {"tenant": "globex"}}, {}, "tenant_mismatch"),
        ({"data": {"accepted": False}}, {}, "invalid_signature"),
        ({"schema": "ingest.v2"}, {}, "invalid_signature"),
        ({"signed_at": str(NOW - 301), "signed_as": {"signed_at": str(NOW - 301)}}, {}, "stale_timestamp"),
        ({"signed_at": str(NOW + 301), "signed_as": {"signed_at": str(NOW + 301)}}, {}, "stale_timestamp"),
        ({}, {"schema": "ingest.v2"}, "schema_mismatch"),
        ({}, {"attestation": "sha256:" + "11" * 32}, "attestation_mismatch"),
        ({"extra": 1}, {}, "invalid_request"),
        ({"nonce": "a.b"}, {}, "invalid_request"),
        ({"schema": "in gest"}, {}, "invalid_request"),
        ({"signed_at": "01795000000"}, {}, "invalid_request"),
        ({"signed_at": NOW}, {}, "invalid_request"),
        ({"data": {"n": 2**60}, "signed_as": {"data": {"n": 1}}}, {}, "malformed_json"),
        ({"data": DEEP, "signed_as": {"data": 1}}, {}, "malformed_json"),
    ],
)  # fmt: skip
async def test_each_check_refuses_with_its_code(
    override: dict[str, Any], kw: dict[str, Any], code: str
) -> None:
    """Each check of the verification order refuses with its own code."""
    private, keys = _keys()
    assert await _code(producer(keys), envelope(private, **override), **kw) == code


async def test_refusals_do_not_burn_the_nonce() -> None:
    """A forged, stale or wrong-schema envelope with a nonce leaves it for the genuine one."""
    private, keys = _keys()
    p = producer(keys)
    assert await _code(p, envelope(private, data={"forged": 1})) == "invalid_signature"
    late = envelope(private, signed_at=str(NOW - 400), signed_as={"signed_at": str(NOW - 400)})
    assert await _code(p, late) == "stale_timestamp"
    assert await _code(p, envelope(private), schema="other") == "schema_mismatch"
    assert (await p.verify_feedback(envelope(private), schema="ingest.v1")).nonce == NONCE


async def test_duplicate_members_in_the_raw_envelope_are_refused() -> None:
    """Raw bytes are parsed strictly: a duplicate member is malformed_json, never last-wins."""
    private, keys = _keys()
    raw = json.dumps(envelope(private)).encode()
    raw = raw[:-1] + b', "tenant": "acme"}'
    assert await _code(producer(keys), raw) == "malformed_json"


def test_nonce_memory_refuses_replays_until_expiry() -> None:
    """A nonce is refused within its TTL, per scope, and accepted again after it."""
    now = [0.0]
    memory = NonceMemory(ttl=10, max_entries=100, clock=lambda: now[0])
    memory.record("acme|k", "n1")
    memory.record("globex|k", "n1")
    with pytest.raises(SignerdError) as info:
        memory.record("acme|k", "n1")
    assert info.value.code == "replayed_nonce"
    now[0] = 10.0
    memory.record("acme|k", "n1")


def test_nonce_memory_is_bounded_and_never_evicts_live_nonces() -> None:
    """When full of live nonces the memory refuses (503 code); expired ones make room."""
    now = [0.0]
    memory = NonceMemory(ttl=10, max_entries=3, clock=lambda: now[0])
    for n in ("a", "b", "c"):
        memory.record("s", n)
    with pytest.raises(SignerdError) as info:
        memory.record("s", "d")
    assert (info.value.code, info.value.status) == ("nonce_store_unavailable", 503)
    with pytest.raises(SignerdError):
        memory.record("s", "a")  # still remembered: nothing was evicted
    now[0] = 10.5
    memory.record("s", "d")
    assert len(memory) == 1


def test_nonce_memory_shorter_than_the_skew_window_is_refused() -> None:
    """A producer refuses a nonce memory whose TTL does not cover twice the skew."""
    _, keys = _keys()
    with pytest.raises(ValueError, match="twice"):
        producer(keys, nonces=NonceMemory(ttl=100), max_skew=300)


def test_signing_input_is_the_documented_concatenation() -> None:
    """The feedback signing input is tenant|signed_at|nonce|schema|kid|RFC8785(data)."""
    data = {"b": [1.0, -0.0, 1.5e-7], "a": "\u00e9"}
    got = feedback_signing_input("acme", NOW, NONCE, "ingest.v1", KID, canonical_data(data))
    assert got == (
        f"acme|{NOW}|{NONCE}|ingest.v1|{KID}|".encode() + '{"a":"\u00e9","b":[1,0,1.5e-7]}'.encode()
    )
    assert b64url(b"\xff") == "_w"


@pytest.mark.parametrize(
    "raw", [bytes([1]) + bytes(31), bytes(32), bytes([1]) + bytes(30) + b"\x80"]
)
def test_static_keys_refuse_small_order_and_non_canonical_keys(raw: bytes) -> None:
    """A producer's pinned JWK that is a small-order or non-canonical point is refused at start."""
    with pytest.raises(ValueError, match="not an acceptable Ed25519 public key"):
        StaticKeys({"acme": [to_jwk(KID, raw)]})


def test_key_cache_drops_small_order_keys() -> None:
    """Keys listed by signerd (JWKS, trusted peer keys) that are weak never enter the cache."""
    from signerd.client._keycache import KeyCache

    cache = KeyCache(ttl=60, refetch_interval=1)
    good = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    cache.replace("acme", [to_jwk("weak", bytes([1]) + bytes(31)), to_jwk("good", good)])
    assert cache.get("acme", "weak") is None
    found = cache.get("acme", "good")
    assert found is not None and found.public_bytes_raw() == good


async def test_producer_nonces_are_per_public_key() -> None:
    """One key pinned under two kids: a nonce accepted under one kid is a replay under the other."""
    private = Ed25519PrivateKey.from_private_bytes(SEED)
    raw = private.public_key().public_bytes_raw()
    p = producer(StaticKeys({"acme": [to_jwk(KID, raw), to_jwk("acme.feedback.v2", raw)]}))
    await p.verify_feedback(envelope(private), schema="ingest.v1")
    again = envelope(private, kid="acme.feedback.v2", signed_as={"kid": "acme.feedback.v2"})
    assert await _code(p, again) == "replayed_nonce"
