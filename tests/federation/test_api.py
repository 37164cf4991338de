"""Federation envelopes against a real daemon: every verification error path, status and code."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonProcess, unique
from ..support.federation import Api, Producer, b64, federation_daemon, fresh_nonce

ATT = "sha256:" + "ab" * 32


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = federation_daemon(tmp_path_factory.mktemp("fed"), {"skew": 60})
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture(scope="module")
def api(fed: DaemonProcess) -> Api:
    return Api(fed)


@pytest.fixture
def tenant() -> str:
    return unique("fd")


@pytest.fixture
def producer(api: Api, tenant: str) -> Producer:
    p = Producer.new(f"prod-{tenant}:2026-01")
    api.trust(tenant, p)
    return p


def own_key(api: Api, tenant: str, name: str) -> str:
    key = f"{tenant}/{name}"
    api.ok("POST", "/v1/keys", {"key": key}, status=201)
    return key


def expect(api: Api, url: str, body: Any, status: int, code: str | None) -> None:
    reply = api("POST", url, body)
    assert (reply.status, reply.code) == (status, code), reply.body


def test_telemetry_own_key_sign_verify_replay(api: Api, tenant: str) -> None:
    """telemetry/sign picks timestamp and nonce; verify answers 200 once, then 409 replayed_nonce."""
    key = own_key(api, tenant, "telemetry")
    body = json.dumps({"cpu": 3, "attestation_measurement_hash": ATT}).encode()
    signed = api.ok("POST", "/v1/telemetry/sign", {"key": key, "body": b64(body)})
    assert set(signed) == {"kid", "timestamp", "nonce", "signature", "tenant"}
    assert signed["tenant"] == tenant
    assert abs(int(signed["timestamp"]) - time.time()) < 5 and len(signed["nonce"]) >= 22
    req = {"tenant": tenant, "body": b64(body), **{k: signed[k] for k in signed}}
    assert api.ok("POST", "/v1/telemetry/verify", {**req, "attestation": ATT}) == {
        "kid": f"{tenant}.telemetry.v1",
        "tenant": tenant,
        "source": "keyring",
        "key": key,
    }
    expect(api, "/v1/telemetry/verify", req, 409, "replayed_nonce")


def test_feedback_own_key_envelope_and_schema(api: Api, tenant: str) -> None:
    """feedback/sign returns the whole envelope; wrong schema 422; right schema 200 then replay 409."""
    key = own_key(api, tenant, "feedback")
    data = {"z": [1.0, -0, 1e2], "a": "é", "attestation_measurement_hash": ATT}
    env = api.ok("POST", "/v1/feedback/sign", {"key": key, "schema": "fb.v1", "data": data})
    assert set(env) == {"tenant", "signed_at", "nonce", "schema", "kid", "data", "signature"}
    assert env["tenant"] == tenant and env["kid"] == f"{tenant}.feedback.v1"
    expect(api, "/v1/feedback/verify", {"envelope": env, "schema": "fb.v2"}, 422, "schema_mismatch")
    other = "sha256:" + "cd" * 32
    bad_att = {"envelope": env, "schema": "fb.v1", "attestation": other}
    expect(api, "/v1/feedback/verify", bad_att, 403, "attestation_mismatch")
    ok = {"envelope": env, "schema": "fb.v1", "attestation": ATT}
    assert api.ok("POST", "/v1/feedback/verify", ok)["source"] == "keyring"
    expect(api, "/v1/feedback/verify", ok, 409, "replayed_nonce")


def test_peer_telemetry_verifies_only_for_its_tenant(
    api: Api, tenant: str, producer: Producer
) -> None:
    """A trusted peer key verifies for its tenant (200); the same kid for another tenant is 403."""
    env = producer.telemetry(tenant, b'{"x":1}')
    got = api.ok("POST", "/v1/telemetry/verify", env)
    assert got == {"kid": producer.kid, "tenant": tenant, "source": "trusted_peer", "key": None}
    other = unique("fo")
    expect(api, "/v1/telemetry/verify", producer.telemetry(other, b"{}"), 403, "tenant_mismatch")


def test_own_kid_of_another_tenant_is_tenant_mismatch(api: Api, tenant: str) -> None:
    """An own key's envelope claiming another tenant is 403 tenant_mismatch."""
    key = own_key(api, tenant, "telemetry")
    signed = api.ok("POST", "/v1/telemetry/sign", {"key": key, "body": b64(b"b")})
    req = {**signed, "tenant": unique("fo"), "body": b64(b"b")}
    expect(api, "/v1/telemetry/verify", req, 403, "tenant_mismatch")


def test_forged_then_genuine_with_same_nonce(api: Api, tenant: str, producer: Producer) -> None:
    """A forged envelope (401) does not burn its nonce: the genuine one with it is accepted."""
    genuine = producer.telemetry(tenant, b'{"v":1}')
    forged = {**genuine, "body": b64(b'{"v":2}')}
    expect(api, "/v1/telemetry/verify", forged, 401, "invalid_signature")
    impostor = Producer.new(producer.kid).telemetry(tenant, b'{"v":1}', nonce=genuine["nonce"])
    expect(api, "/v1/telemetry/verify", impostor, 401, "invalid_signature")
    api.ok("POST", "/v1/telemetry/verify", genuine)


def test_unknown_kid(api: Api, tenant: str) -> None:
    """A kid nobody trusts is 401 unknown_kid, for peer-style and signerd-style kids."""
    env = Producer.new("nobody-knows-me").telemetry(tenant, b"{}")
    expect(api, "/v1/telemetry/verify", env, 401, "unknown_kid")
    env = Producer.new(f"{tenant}.nokey.v1").telemetry(tenant, b"{}")
    expect(api, "/v1/telemetry/verify", env, 401, "unknown_kid")


def test_stale_and_future_timestamps(api: Api, tenant: str, producer: Producer) -> None:
    """Timestamps beyond the skew (60 s here) either way are 401 stale_timestamp; the nonce stays free."""
    nonce = fresh_nonce()
    now = int(time.time())
    for ts in (now - 120, now + 120):
        env = producer.telemetry(tenant, b"{}", timestamp=ts, nonce=nonce)
        expect(api, "/v1/telemetry/verify", env, 401, "stale_timestamp")
        fb = producer.feedback(tenant, "s", {}, signed_at=ts, nonce=nonce)
        expect(api, "/v1/feedback/verify", {"envelope": fb, "schema": "s"}, 401, "stale_timestamp")
    api.ok("POST", "/v1/telemetry/verify", producer.telemetry(tenant, b"{}", nonce=nonce))


def test_telemetry_attestation(api: Api, tenant: str, producer: Producer) -> None:
    """With an expected attestation, a body without that exact hash (or not JSON) is 403."""
    for body in (b'{"attestation_measurement_hash":"sha256:' + b"00" * 32 + b'"}', b"not json"):
        env = {**producer.telemetry(tenant, body), "attestation": ATT}
        expect(api, "/v1/telemetry/verify", env, 403, "attestation_mismatch")
    body = json.dumps({"attestation_measurement_hash": ATT, "n": 1}).encode()
    api.ok("POST", "/v1/telemetry/verify", {**producer.telemetry(tenant, body), "attestation": ATT})


@pytest.mark.parametrize("number", ["1e21", "1E+21", "1000000000000000000000", "9007199254740992"])
def test_numbers_beyond_the_safe_range_are_refused_however_written(
    api: Api, tenant: str, producer: Producer, number: str
) -> None:
    """A number beyond 2^53 - 1, nested and in any spelling: feedback sign is 400 malformed_json,
    and a telemetry body checked for attestation is 403 attestation_mismatch."""
    key = own_key(api, tenant, "feedback")
    raw = '{"key": "' + key + '", "schema": "s", "data": {"a": [{"n": ' + number + "}]}}"
    reply = api("POST", "/v1/feedback/sign", raw=raw.encode())
    assert (reply.status, reply.code) == (400, "malformed_json"), reply.body
    body = b'{"attestation_measurement_hash":"%s","a":[{"n":%s}]}' % (ATT.encode(), number.encode())
    env = {**producer.telemetry(tenant, body), "attestation": ATT}
    expect(api, "/v1/telemetry/verify", env, 403, "attestation_mismatch")


def test_signature_moved_between_flows_is_refused(api: Api, tenant: str) -> None:
    """A telemetry signature presented as feedback (and back) is 401 invalid_signature."""
    key = own_key(api, tenant, "both")
    t = api.ok("POST", "/v1/telemetry/sign", {"key": key, "body": b64(b"{}")})
    f = api.ok("POST", "/v1/feedback/sign", {"key": key, "schema": "s", "data": {}})
    moved_to_feedback = {**f, "signature": t["signature"], "nonce": t["nonce"]}
    expect(
        api,
        "/v1/feedback/verify",
        {"envelope": moved_to_feedback, "schema": "s"},
        401,
        "invalid_signature",
    )
    moved_to_telemetry = {
        "tenant": tenant,
        "kid": f["kid"],
        "timestamp": f["signed_at"],
        "nonce": f["nonce"],
        "body": b64(b"{}"),
        "signature": f["signature"],
    }
    expect(api, "/v1/telemetry/verify", moved_to_telemetry, 401, "invalid_signature")
    api.ok("POST", "/v1/feedback/verify", {"envelope": f, "schema": "s"})


def test_feedback_peer_envelope_and_tamper(api: Api, tenant: str, producer: Producer) -> None:
    """A peer's feedback verifies by kid; changing data, schema or tenant breaks the signature."""
    env = producer.feedback(tenant, "policy.adjust:v1", {"b": 2, "a": [1, 2.5]})
    for changed in ({"data": {"b": 3, "a": [1, 2.5]}}, {"schema": "policy.adjust:v2"}):
        req = {"envelope": {**env, **changed}, "schema": {**env, **changed}["schema"]}
        expect(api, "/v1/feedback/verify", req, 401, "invalid_signature")
    reordered = {**env, "data": {"a": [1.0, 2.5], "b": 2}}  # same canonical form
    api.ok("POST", "/v1/feedback/verify", {"envelope": reordered, "schema": "policy.adjust:v1"})


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        (b'{"envelope": {"a": 1, "a": 2}, "schema": "s"}', 400, "malformed_json"),
        (b'{"envelope": {}, "schema": "s", "x": NaN}', 400, "malformed_json"),
        (b'{"envelope": {}, "schema": "s", "x": 9007199254740993}', 400, "malformed_json"),
        (b'{"envelope": {}, "schema": "s", "x": 0.10000000000000001}', 400, "malformed_json"),
        (b'{"envelope": {}, "schema": "s", "x": "\\ud800"}', 400, "malformed_json"),
        (
            b'{"envelope": {}, "schema": "s", "x": ' + b"[" * 40 + b"]" * 40 + b"}",
            400,
            "malformed_json",
        ),
        (b'{"envelope": {}, "schema": "s", "x": 1}', 400, "invalid_request"),
        (b'{"envelope": {}, "schema": "s"}', 400, "invalid_request"),
        (b'{"envelope": [], "schema": "s"}', 400, "invalid_request"),
    ],
)
def test_feedback_verify_refuses_bad_json(api: Api, raw: bytes, status: int, code: str) -> None:
    """Ambiguous or malformed JSON and unknown or missing fields are refused with their code."""
    reply = api("POST", "/v1/feedback/verify", raw=raw)
    assert (reply.status, reply.code) == (status, code), reply.body


def test_field_grammar_refusals(api: Api, tenant: str, producer: Producer) -> None:
    """Bad timestamp, nonce, schema, kid, tenant, attestation and base64 are 400s."""
    env = producer.telemetry(tenant, b"{}")
    for field, value, code in [
        ("timestamp", "0123", "invalid_request"),
        ("timestamp", "+1", "invalid_request"),
        ("timestamp", 1700000000, "invalid_request"),
        ("nonce", "short", "invalid_request"),
        ("nonce", "a.b" * 10, "invalid_request"),
        ("nonce", "AAAAAAAAAAAAAAAAAAAAAB", "invalid_request"),  # non-canonical last char
        ("kid", "a|b", "invalid_request"),
        ("tenant", "Acme", "invalid_request"),
        ("attestation", "sha256:XYZ", "invalid_request"),
        ("body", "not base64!", "invalid_base64"),
        ("extra", 1, "invalid_request"),
    ]:
        expect(api, "/v1/telemetry/verify", {**env, field: value}, 400, code)
    fb = producer.feedback(tenant, "s", {})
    expect(
        api, "/v1/feedback/verify", {"envelope": fb, "schema": "bad schema"}, 400, "invalid_request"
    )
    api.ok("POST", "/v1/telemetry/verify", env)  # none of the refusals burned the nonce


def test_feedback_data_over_the_limit_is_413(tmp_path: Path) -> None:
    """Canonical data larger than federation.max_json_bytes is 413 payload_too_large, at sign and verify."""
    d = federation_daemon(tmp_path / "d", {"max_json_bytes": 1024})
    try:
        api = Api(d)
        tenant = unique("fl")
        key = own_key(api, tenant, "feedback")
        big = {"x": "y" * 2000}
        reply = api("POST", "/v1/feedback/sign", {"key": key, "schema": "s", "data": big})
        assert (reply.status, reply.code) == (413, "payload_too_large")
        p = Producer.new("p-big")
        api.trust(tenant, p)
        env = p.feedback(tenant, "s", big)
        expect(
            api, "/v1/feedback/verify", {"envelope": env, "schema": "s"}, 413, "payload_too_large"
        )
    finally:
        d.stop()


def test_policy_must_allow_the_tenant(tmp_path: Path) -> None:
    """A caller whose policy does not grant verify on the envelope's tenant gets 403 permission_denied."""
    import os

    allowed, other = unique("pa"), unique("pb")
    policy = {
        "rules": [
            {
                "name": "admin",
                "uids": [os.getuid()],
                "tenants": [allowed, other],
                "operations": ["trust"],
            },
            {"name": "gw", "uids": [os.getuid()], "tenants": [allowed], "operations": ["verify"]},
        ]
    }
    d = federation_daemon(tmp_path / "d", policy=policy)
    try:
        api = Api(d)
        p, q = Producer.new("p-policy"), Producer.new("p-policy")  # one key per tenant
        api.trust(other, p)
        api.trust(allowed, q)
        expect(api, "/v1/telemetry/verify", p.telemetry(other, b"{}"), 403, "permission_denied")
        api.ok("POST", "/v1/telemetry/verify", q.telemetry(allowed, b"{}"))
    finally:
        d.stop()


def test_each_verification_is_one_audit_record(
    fed: DaemonProcess, api: Api, tenant: str, producer: Producer
) -> None:
    """Accepted and refused verifications are one record each with the request id; replays are security events."""
    env = producer.telemetry(tenant, b"{}")
    api("POST", "/v1/telemetry/verify", env, headers={"X-Request-Id": f"ok-{tenant}"})
    api("POST", "/v1/telemetry/verify", env, headers={"X-Request-Id": f"again-{tenant}"})
    forged = {**producer.telemetry(tenant, b"{}"), "body": b64(b"[]")}
    api("POST", "/v1/telemetry/verify", forged, headers={"X-Request-Id": f"forged-{tenant}"})
    deadline = time.monotonic() + 10
    records: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        lines = fed.audit_records()
        records = {
            rid: [r for r in lines if r["request_id"] == rid]
            for rid in (f"ok-{tenant}", f"again-{tenant}", f"forged-{tenant}")
        }
        if all(records.values()):
            break
        time.sleep(0.05)
    (ok,), (again,), (forged_rec,) = records.values()
    assert (ok["outcome"], ok["operation"], ok["tenant"], ok["kid"]) == (
        "ok",
        "verify",
        tenant,
        producer.kid,
    )
    assert "security" not in ok and len(ok["payload_hmac"]) == 1
    assert (again["outcome"], again["status"], again.get("security")) == (
        "replayed_nonce",
        409,
        True,
    )
    assert (forged_rec["outcome"], forged_rec.get("security")) == ("invalid_signature", True)


def test_trusted_keys_admin(api: Api, tenant: str) -> None:
    """Add (201), duplicate (409), list by tenant, retire (then 401 retired_kid), retire again (409)."""
    p = Producer.new("p-admin")
    api.trust(tenant, p)
    reply = api("POST", "/v1/trusted-keys", {"tenant": tenant, "kid": p.kid, "jwk": p.jwk()})
    assert (reply.status, reply.code) == (409, "key_exists")
    listed = api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"]
    assert [(k["kid"], k["state"], k["jwk"]["x"]) for k in listed] == [
        (p.kid, "active", p.jwk()["x"])
    ]
    env = p.telemetry(tenant, b"{}")
    retired = api.ok("POST", f"/v1/trusted-keys/{tenant}/{p.kid}/retire")
    assert retired["state"] == "retired"
    expect(api, "/v1/telemetry/verify", env, 401, "retired_kid")
    reply = api("POST", f"/v1/trusted-keys/{tenant}/{p.kid}/retire")
    assert (reply.status, reply.code) == (409, "invalid_state")
    reply = api("POST", f"/v1/trusted-keys/{tenant}/nope/retire")
    assert (reply.status, reply.code) == (404, "unknown_key")


@pytest.mark.parametrize("alg", ["Ed25519", "EdDSA"])
def test_trusted_keys_accept_either_jwk_alg(api: Api, alg: str) -> None:
    """A trusted key sent with alg Ed25519 or EdDSA is added and verifies; listed as Ed25519."""
    tenant = unique("ta")
    p = Producer.new("p-alg")
    jwk = {**p.jwk(), "alg": alg, "use": "sig"}
    api.ok("POST", "/v1/trusted-keys", {"tenant": tenant, "kid": p.kid, "jwk": jwk}, status=201)
    (listed,) = api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"]
    assert (listed["jwk"]["alg"], listed["jwk"]["x"]) == ("Ed25519", jwk["x"])
    api.ok("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
    bad = {**jwk, "alg": "ES256"}
    reply = api("POST", "/v1/trusted-keys", {"tenant": tenant, "kid": "other", "jwk": bad})
    assert (reply.status, reply.code) == (400, "invalid_request")


def test_trusted_key_refusals(api: Api, tenant: str) -> None:
    """Private JWKs, non-Ed25519 JWKs, bad kids, and a kid naming an own key are refused."""
    own_key(api, tenant, "feedback")
    p = Producer.new("p-refused")
    priv = {**p.jwk(), "d": b64(b"x" * 32)}
    for body, status, code in [
        ({"tenant": tenant, "kid": p.kid, "jwk": priv}, 400, "invalid_request"),
        (
            {"tenant": tenant, "kid": p.kid, "jwk": {**p.jwk(), "crv": "X25519"}},
            400,
            "invalid_request",
        ),
        ({"tenant": tenant, "kid": p.kid, "jwk": {**p.jwk(), "x": "AAAA"}}, 400, "invalid_request"),
        (
            {"tenant": tenant, "kid": p.kid, "jwk": {**p.jwk(), "kid": "other"}},
            400,
            "invalid_request",
        ),
        ({"tenant": tenant, "kid": "a/b", "jwk": p.jwk()}, 400, "invalid_request"),
        ({"tenant": tenant, "kid": f"{tenant}.feedback.v7", "jwk": p.jwk()}, 409, "key_exists"),
    ]:
        expect(api, "/v1/trusted-keys", body, status, code)


def test_peer_kid_never_shadows_an_own_kid(api: Api, tenant: str) -> None:
    """A peer trusted under a signerd-style kid stops resolving once signerd holds that key name."""
    p = Producer.new(f"{tenant}.later.v1")
    api.trust(tenant, p)  # signerd has no key tenant/later yet: allowed
    api.ok("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
    own_key(api, tenant, "later")  # now tenant.later.v1 is signerd's own kid
    expect(api, "/v1/telemetry/verify", p.telemetry(tenant, b"{}"), 401, "invalid_signature")
    p2 = Producer.new(f"{tenant}.later.v2")
    reply = api("POST", "/v1/trusted-keys", {"tenant": tenant, "kid": p2.kid, "jwk": p2.jwk()})
    assert (reply.status, reply.code) == (409, "key_exists")


def test_unsupported_media_type(api: Api) -> None:
    """Envelope endpoints take application/json only (415)."""
    reply = api("POST", "/v1/telemetry/verify", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert (reply.status, reply.code) == (415, "unsupported_media_type")


def test_signed_telemetry_input_is_exact(api: Api, tenant: str) -> None:
    """The signature covers exactly timestamp.nonce.body (checked with the published public key)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key = own_key(api, tenant, "exact")
    s = api.ok("POST", "/v1/telemetry/sign", {"key": key, "body": b64(b"\x00raw\xff")})
    jwk = api.ok("GET", f"/v1/kids/{s['kid']}")["jwk"]
    pub = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "="))
    pub.verify(
        base64.b64decode(s["signature"]),
        f"{s['timestamp']}.{s['nonce']}.".encode() + b"\x00raw\xff",
    )


def test_trust_is_audited_like_an_admin_operation(fed: DaemonProcess, api: Api) -> None:
    """Adding a trusted key writes an intent record, then the outcome, under operation trust."""
    tenant = unique("ta")
    p = Producer.new("p-audited")
    rid = f"trust-{tenant}"
    reply = api(
        "POST",
        "/v1/trusted-keys",
        {"tenant": tenant, "kid": p.kid, "jwk": p.jwk()},
        headers={"X-Request-Id": rid},
    )
    assert reply.status == 201, reply.body
    deadline = time.monotonic() + 10
    mine: list[dict[str, Any]] = []
    while time.monotonic() < deadline and len(mine) < 2:
        lines = fed.audit_records()
        mine = [r for r in lines if r["request_id"] == rid]
        time.sleep(0.05)
    assert [(r["operation"], r["outcome"], r["tenant"], r["kid"]) for r in mine] == [
        ("trust", "intent", tenant, p.kid),
        ("trust", "ok", tenant, p.kid),
    ]


def test_one_public_key_belongs_to_one_tenant(api: Api, tenant: str) -> None:
    """Trusting a tenant's peer key (even once retired) or one of signerd's own keys for another
    tenant is 409 shared_peer_key; a second kid in the same tenant is allowed and replays."""
    p = Producer.new("p-one-tenant")
    api.trust(tenant, p)
    other = unique("fs")
    for kid in (p.kid, "p-other-kid"):
        body = {"tenant": other, "kid": kid, "jwk": p.jwk()}
        expect(api, "/v1/trusted-keys", body, 409, "shared_peer_key")
    assert api.ok("GET", f"/v1/trusted-keys?tenant={other}")["keys"] == []
    second = Producer(f"{p.kid}-b", p.key)
    api.trust(tenant, second)
    env = p.telemetry(tenant, b"{}")
    api.ok("POST", "/v1/telemetry/verify", env)
    expect(api, "/v1/telemetry/verify", {**env, "kid": second.kid}, 409, "replayed_nonce")
    for kid in (p.kid, second.kid):
        api.ok("POST", f"/v1/trusted-keys/{tenant}/{kid}/retire")
    body = {"tenant": other, "kid": p.kid, "jwk": p.jwk()}
    expect(api, "/v1/trusted-keys", body, 409, "shared_peer_key")

    key = own_key(api, tenant, "own-telemetry")
    x = api.ok("GET", f"/v1/kids/{tenant}.own-telemetry.v1")["jwk"]["x"]
    own = {"kty": "OKP", "crv": "Ed25519", "x": x}
    expect(
        api,
        "/v1/trusted-keys",
        {"tenant": other, "kid": "copy", "jwk": own},
        409,
        "shared_peer_key",
    )
    api.ok("POST", "/v1/trusted-keys", {"tenant": tenant, "kid": "copy", "jwk": own}, status=201)
    signed = api.ok("POST", "/v1/telemetry/sign", {"key": key, "body": b64(b"{}")})
    req = {"tenant": tenant, "body": b64(b"{}"), **signed}
    api.ok("POST", "/v1/telemetry/verify", req)
    expect(api, "/v1/telemetry/verify", {**req, "kid": "copy"}, 409, "replayed_nonce")


# small-order points (identity, order 2, order 4, order 8) and non-canonical encodings
# (y = p + 1, the identity; the identity and the order-2 point with the sign bit set)
WEAK_X = [
    "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "7P_______________________________________38",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIA",
    "JuiVj8KyJ7BFw_SJ8u-Y8NXfrAXTxjM5sTgCiG1T_AU",
    "JuiVj8KyJ7BFw_SJ8u-Y8NXfrAXTxjM5sTgCiG1T_IU",
    "xxdqcD1N2E-6PAt2DRBnDyogU_osOczGTsf9d5KsA3o",
    "xxdqcD1N2E-6PAt2DRBnDyogU_osOczGTsf9d5KsA_o",
    "7v_______________________________________38",
    "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAIA",
    "7P________________________________________8",
]


def test_weak_peer_keys_are_refused_by_the_trust_api(api: Api, tenant: str) -> None:
    """Small-order and non-canonical JWKs are 400 invalid_request, never trusted: the forged
    signature 01 00..00 || 00..00 that such a key would accept finds no key (401)."""
    for i, x in enumerate(WEAK_X):
        kid = f"weak-{i}"
        body = {"tenant": tenant, "kid": kid, "jwk": {"kty": "OKP", "crv": "Ed25519", "x": x}}
        reply = api("POST", "/v1/trusted-keys", body)
        assert (reply.status, reply.code) == (400, "invalid_request"), (x, reply.body)
        assert "not an acceptable Ed25519 key" in reply.json["error"]["message"]
        forged = {
            "tenant": tenant,
            "kid": kid,
            "timestamp": str(int(time.time())),
            "nonce": fresh_nonce(),
            "body": b64(b"anything at all"),
            "signature": b64(bytes([1]) + bytes(63)),
        }
        expect(api, "/v1/telemetry/verify", forged, 401, "unknown_kid")
    assert api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"] == []


def test_shared_key_refusal_is_a_security_event(fed: DaemonProcess, api: Api, tenant: str) -> None:
    """Trying to trust another tenant's key is refused before any change is attempted, and
    audited as one record with security: true."""
    p = Producer.new("p-audited-share")
    api.trust(tenant, p)
    other, rid = unique("fa"), f"share-{tenant}"
    body = {"tenant": other, "kid": p.kid, "jwk": p.jwk()}
    reply = api("POST", "/v1/trusted-keys", body, headers={"X-Request-Id": rid})
    assert (reply.status, reply.code) == (409, "shared_peer_key")
    mine: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not mine:
        mine = [r for r in fed.audit_records() if r["request_id"] == rid]
        time.sleep(0.05)
    assert [(r["operation"], r["outcome"], r["tenant"], r.get("security")) for r in mine] == [
        ("trust", "shared_peer_key", other, True)
    ]


def test_trusted_key_changes_replay_under_their_idempotency_key(api: Api) -> None:
    """Adding and retiring a trusted key, repeated with their Idempotency-Keys, answer as the
    first time (a repeated add is 201 again, not key_exists); the add's key for another JWK is
    422 idempotency_key_reused, and a malformed key is 400."""
    tenant = unique("ti")
    p, q = Producer.new("p-idem"), Producer.new("q-idem")
    add = {"tenant": tenant, "kid": p.kid, "jwk": p.jwk()}
    k1 = {"Idempotency-Key": unique("trust-add")}
    first = api("POST", "/v1/trusted-keys", add, headers=k1)
    assert first.status == 201, first.body
    again = api("POST", "/v1/trusted-keys", add, headers=k1)
    assert (again.status, again.json) == (201, first.json)
    assert again.headers["idempotent-replayed"] == "true"
    reused = api("POST", "/v1/trusted-keys", {**add, "jwk": q.jwk()}, headers=k1)
    assert (reused.status, reused.code) == (422, "idempotency_key_reused")
    bad = api("POST", "/v1/trusted-keys", add, headers={"Idempotency-Key": "no spaces"})
    assert (bad.status, bad.code) == (400, "invalid_request")
    url = f"/v1/trusted-keys/{tenant}/{p.kid}/retire"
    k2 = {"Idempotency-Key": unique("trust-retire")}
    retired = api("POST", url, {}, headers=k2)
    assert retired.status == 200 and retired.json["state"] == "retired"
    again = api("POST", url, {}, headers=k2)
    assert (again.status, again.json) == (200, retired.json)
    assert again.headers["idempotent-replayed"] == "true"
    assert api("POST", url, {}).code == "invalid_state"  # without the key: a second retire
    listed = api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"]
    assert [(k["kid"], k["state"]) for k in listed] == [(p.kid, "retired")]
