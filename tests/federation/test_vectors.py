"""The stored federation test vectors (tests/vectors/federation.json) match the implementation."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from signerd.errors import MalformedJson
from signerd.wire import canonical, feedback_input, loads_strict, telemetry_input

from ..cli.test_cli import Ctl
from ..support.federation import RFC8032_PUBLIC, RFC8032_SEED, Api, federation_daemon

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "vectors" / "federation.json").read_text(encoding="utf-8")
)
T, F = VECTORS["telemetry"], VECTORS["feedback"]
REFUSED: list[dict[str, Any]] = VECTORS["refused"]
SKEW = 2_000_000_000  # the vectors carry fixed 2026 timestamps


def raw_envelope(data_text: str, signed_as: str) -> str:
    """The feedback vector's envelope with ``data_text`` spliced in as written, signed over
    ``signed_as`` as the canonical data (built by hand: independent of signerd.wire)."""
    head = "|".join([F["tenant"], F["signed_at"], F["nonce"], F["schema"], F["kid"]])
    signature = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).sign(
        head.encode() + b"|" + signed_as.encode()
    )
    fields = {k: F[k] for k in ("tenant", "signed_at", "nonce", "schema", "kid")}
    fields["signature"] = base64.b64encode(signature).decode()
    return json.dumps(fields)[:-1] + ', "data": ' + data_text + "}"


def test_vector_key_is_rfc8032_test_1() -> None:
    """The vectors' key is RFC 8032 TEST 1 (seed and public key), and its JWK x is that key."""
    key = VECTORS["key"]
    assert bytes.fromhex(key["seed_hex"]) == RFC8032_SEED
    assert bytes.fromhex(key["public_hex"]) == RFC8032_PUBLIC
    assert base64.urlsafe_b64decode(key["jwk"]["x"] + "=") == RFC8032_PUBLIC


def test_telemetry_vector() -> None:
    """timestamp.nonce.body is the stored input byte for byte, and its signature is the stored one."""
    body = base64.b64decode(T["body"])
    assert body == T["body_text"].encode()
    built = telemetry_input(T["timestamp"], T["nonce"], body)
    assert built == bytes.fromhex(T["signature_input_hex"]) == T["signature_input_text"].encode()
    assert built == f"{T['timestamp']}.{T['nonce']}.".encode() + body
    signature = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).sign(built)
    assert base64.b64encode(signature).decode() == T["signature"]


def test_feedback_vector() -> None:
    """RFC 8785 of data_text is the stored canonical_data; the |-joined input and signature match."""
    data = canonical(F["data_text"].encode())
    assert data == F["canonical_data"].encode()
    built = feedback_input(F["tenant"], F["signed_at"], F["nonce"], F["schema"], F["kid"], data)
    assert built == bytes.fromhex(F["signature_input_hex"]) == F["signature_input_text"].encode()
    head = "|".join([F["tenant"], F["signed_at"], F["nonce"], F["schema"], F["kid"]])
    assert built == head.encode() + b"|" + data
    signature = Ed25519PrivateKey.from_private_bytes(RFC8032_SEED).sign(built)
    assert base64.b64encode(signature).decode() == F["signature"]


def test_vectors_verify_through_the_daemon(tmp_path: Path) -> None:
    """A daemon trusting the vector key accepts both vector envelopes, and refuses them swapped."""
    skew = 2_000_000_000  # the vectors carry fixed 2026 timestamps
    d = federation_daemon(tmp_path / "d", {"skew": skew, "nonce_ttl": 2 * skew})
    try:
        api = Api(d)
        jwk = VECTORS["key"]["jwk"]
        for kid in (T["kid"], F["kid"]):
            api.ok("POST", "/v1/trusted-keys", {"tenant": "acme", "kid": kid, "jwk": jwk}, 201)
        tel = {k: T[k] for k in ("tenant", "kid", "timestamp", "nonce", "body", "signature")}
        envelope = {k: F[k] for k in ("tenant", "signed_at", "nonce", "schema", "kid", "signature")}
        envelope["data"] = json.loads(F["data_text"])
        swapped = api("POST", "/v1/telemetry/verify", {**tel, "signature": F["signature"]})
        assert (swapped.status, swapped.code) == (401, "invalid_signature")
        attestation = "sha256:" + "0123456789abcdef" * 4
        api.ok("POST", "/v1/telemetry/verify", {**tel, "attestation": attestation})
        api.ok(
            "POST",
            "/v1/feedback/verify",
            {"envelope": envelope, "schema": F["schema"], "attestation": attestation},
        )
    finally:
        d.stop()


@pytest.mark.parametrize("v", REFUSED, ids=[v["data_text"] for v in REFUSED])
def test_refused_vectors_break_the_wire_rules(v: dict[str, Any]) -> None:
    """Each refused data text is malformed_json to parse_json and loads_strict alike, while a
    lax parser accepts it as the vector says (so a signature over that form would verify)."""
    with pytest.raises(MalformedJson):
        canonical(v["data_text"].encode())
    with pytest.raises(MalformedJson):
        loads_strict(v["data_text"].encode())
    if v["lax_canonical_data"] is not None:
        assert rfc8785.dumps(json.loads(v["data_text"])).decode() == v["lax_canonical_data"]


def test_refused_vectors_through_the_daemon_and_signerctl(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """/v1/feedback/verify and `signerctl feedback verify` refuse every refused vector as
    malformed_json, signed as a lax verifier would check it; the same builder's genuine envelope
    verifies."""
    assert len(REFUSED) >= 6
    d = federation_daemon(tmp_path / "d", {"skew": SKEW, "nonce_ttl": 2 * SKEW})
    try:
        api, ctl = Api(d), Ctl(d, capsys)
        api.ok(
            "POST", "/v1/trusted-keys", {"tenant": "acme", "kid": F["kid"], "jwk": VECTORS["key"]["jwk"]}, 201
        )  # fmt: skip
        for i, v in enumerate(REFUSED):
            envelope = raw_envelope(v["data_text"], v["lax_canonical_data"] or v["data_text"])
            body = '{"schema": "' + F["schema"] + '", "envelope": ' + envelope + "}"
            reply = api("POST", "/v1/feedback/verify", raw=body.encode())
            assert (reply.status, reply.code) == (400, "malformed_json"), v["why"]
            path = tmp_path / f"refused-{i}.json"
            path.write_text(envelope, encoding="utf-8")
            code, _, err = ctl(
                "feedback", "verify", "--schema", F["schema"], "--envelope-file", str(path)
            )
            assert (code, "malformed_json" in err) == (os.EX_PROTOCOL, True), v["why"]
        genuine = raw_envelope(F["data_text"], F["canonical_data"])
        body = '{"schema": "' + F["schema"] + '", "envelope": ' + genuine + "}"
        assert api("POST", "/v1/feedback/verify", raw=body.encode()).status == 200
    finally:
        d.stop()


@pytest.mark.parametrize("flow", ["telemetry", "feedback"])
def test_no_input_of_one_flow_parses_as_the_other(flow: str) -> None:
    """The first non-digit byte is '.' in telemetry inputs and never '.' in feedback inputs."""
    raw = bytes.fromhex(VECTORS[flow]["signature_input_hex"])
    first = next(b for b in raw if not 0x30 <= b <= 0x39)
    assert (first == ord(".")) == (flow == "telemetry")


_digits = st.integers(min_value=0, max_value=10**12 - 1).map(str)
_nonce = st.binary(min_size=16, max_size=48).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
)


@settings(max_examples=300, deadline=None)
@given(
    _digits,
    _nonce,
    st.binary(max_size=64),
    st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
)
def test_flows_are_disjoint(
    ts: str, nonce: str, body: bytes, tenant: str, schema: str, kid: str
) -> None:
    """Generated inputs: telemetry's first non-digit byte is '.', feedback's never is."""

    def first_non_digit(raw: bytes) -> int:
        return next(b for b in raw if not 0x30 <= b <= 0x39)

    assert first_non_digit(telemetry_input(ts, nonce, body)) == ord(".")
    fb = feedback_input(tenant, ts, nonce, schema, kid, b"{}")
    assert first_non_digit(fb) != ord(".")
