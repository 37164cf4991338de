"""The v1 wire contract against a real daemon on a real SoftHSM token."""

from __future__ import annotations

import base64
import json
import random
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.wire import from_jwk

from ..conftest import DaemonProcess, unique
from ..support.federation import Api, b64


@pytest.fixture(scope="module")
def api(daemon: DaemonProcess) -> Api:
    return Api(daemon)


@pytest.fixture
def key(api: Api) -> str:
    name = f"{unique('api')}/feedback"
    api.ok("POST", "/v1/keys", {"key": name}, status=201)
    return name


def test_full_lifecycle_over_http(api: Api, key: str) -> None:
    """sign -> rotate -> old verifies, new signs -> retire refuses -> destroy answers destroyed_kid."""
    tenant, name = key.split("/")
    s1 = api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"hello")})
    assert s1["kid"] == f"{tenant}.{name}.v1"
    rotated = api.ok("POST", f"/v1/keys/{key}/rotate", {})
    assert (
        rotated["kid"] == f"{tenant}.{name}.v2" and rotated["key"]["active_kid"] == rotated["kid"]
    )
    s2 = api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"hello")})
    assert s2["kid"] == rotated["kid"]
    v = api.ok(
        "POST",
        "/v1/verify",
        {"kid": s1["kid"], "data": b64(b"hello"), "signature": s1["signature"]},
    )
    assert v == {"kid": s1["kid"], "key": key, "state": "verify-only"}
    api.ok(
        "POST",
        "/v1/verify",
        {"kid": s2["kid"], "data": b64(b"hello"), "signature": s2["signature"]},
    )

    api.ok("POST", f"/v1/keys/{key}/versions/1/retire", {})
    r = api(
        "POST",
        "/v1/verify",
        {"kid": s1["kid"], "data": b64(b"hello"), "signature": s1["signature"]},
    )
    assert (r.status, r.code) == (401, "retired_kid")

    r = api("POST", f"/v1/keys/{key}/versions/1/destroy", {"now": True})
    assert (r.status, r.code) == (400, "confirmation_required")
    desc = api.ok("POST", f"/v1/keys/{key}/versions/1/destroy", {"confirm": s1["kid"], "now": True})
    assert desc["versions"][0]["state"] == "destroyed"
    r = api(
        "POST",
        "/v1/verify",
        {"kid": s1["kid"], "data": b64(b"hello"), "signature": s1["signature"]},
    )
    assert (r.status, r.code) == (401, "destroyed_kid")
    info = api.ok("GET", f"/v1/kids/{s1['kid']}")
    assert info["state"] == "destroyed" and info["pem"].startswith("-----BEGIN PUBLIC KEY-----")


def test_staged_rotation(api: Api, key: str) -> None:
    """A pending version is published in the JWKS but does not sign until promoted."""
    tenant = key.split("/")[0]
    rotated = api.ok("POST", f"/v1/keys/{key}/rotate", {"pending": True})
    pending = rotated["kid"]
    assert rotated["key"]["active_kid"] != pending
    jwks = api.ok("GET", f"/v1/jwks?tenant={tenant}")
    assert pending in {k["kid"] for k in jwks["keys"]}
    assert api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"x")})["kid"] != pending
    api.ok("POST", f"/v1/keys/{key}/versions/2/promote", {})
    assert api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"x")})["kid"] == pending


def test_jwks_is_rfc8037_and_verifies_signatures(api: Api, key: str) -> None:
    """JWKS entries are OKP/Ed25519 (alg Ed25519)/sig JWKs that verify signerd's signatures locally."""
    tenant = key.split("/")[0]
    signed = api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"jwks")})
    jwks = api.ok("GET", f"/v1/jwks?tenant={tenant}")["keys"]
    (jwk,) = [k for k in jwks if k["kid"] == signed["kid"]]
    assert {k: jwk[k] for k in ("kty", "crv", "alg", "use")} == {
        "kty": "OKP",
        "crv": "Ed25519",
        "alg": "Ed25519",
        "use": "sig",
    }
    _, public = from_jwk(jwk)
    assert isinstance(public, Ed25519PublicKey)
    public.verify(base64.b64decode(signed["signature"]), b"jwks")


def test_batch_sign_answers_item_by_item(api: Api, key: str) -> None:
    """A batch signs each item and reports a per-item error for an unknown key."""
    tenant = key.split("/")[0]
    items = [{"key": key, "data": b64(f"m{i}".encode())} for i in range(5)]
    items.insert(2, {"key": f"{tenant}/missing", "data": b64(b"x")})
    results = api.ok("POST", "/v1/sign", {"items": items})["results"]
    assert len(results) == 6
    assert results[2]["error"]["code"] == "unknown_key"
    for i, r in enumerate(results[:2] + results[3:]):
        v = api.ok(
            "POST",
            "/v1/verify",
            {"kid": r["kid"], "data": b64(f"m{i}".encode()), "signature": r["signature"]},
        )
        assert v["key"] == key


def test_list_and_describe(api: Api, key: str) -> None:
    """GET /v1/keys?tenant= lists the tenant's keys; GET /v1/keys/T/N describes one."""
    tenant = key.split("/")[0]
    listed = api.ok("GET", f"/v1/keys?tenant={tenant}")["keys"]
    assert [k["key"] for k in listed] == [key]
    assert api.ok("GET", f"/v1/keys/{key}") == listed[0]


BAD_INPUTS = [
    (
        "POST",
        "/v1/sign",
        b'{"key": "a/b", "data": "YQ==", "key": "c/d"}',
        {},
        400,
        "malformed_json",
    ),
    ("POST", "/v1/sign", b'{"key": "a/b", "data": NaN}', {}, 400, "malformed_json"),
    ("POST", "/v1/sign", b"{not json", {}, 400, "malformed_json"),
    ("POST", "/v1/sign", b'{"key": "a/b", "data": "YQ==", "extra": 1}', {}, 400, "invalid_request"),
    ("POST", "/v1/sign", b'{"key": "a/b"}', {}, 400, "invalid_request"),
    ("POST", "/v1/sign", b'["a/b"]', {}, 400, "invalid_request"),
    ("POST", "/v1/sign", b'{"key": "a/b", "data": 5}', {}, 400, "invalid_request"),
    ("POST", "/v1/sign", b'{"key": "a/b", "data": "not base64!"}', {}, 400, "invalid_base64"),
    ("POST", "/v1/sign", b'{"key": "a/b", "data": "YQ"}', {}, 400, "invalid_base64"),
    ("POST", "/v1/sign", b'{"key": "A/B", "data": "YQ=="}', {}, 400, "invalid_key_name"),
    ("POST", "/v1/sign", b'{"key": "a/b/c", "data": "YQ=="}', {}, 400, "invalid_key_name"),
    ("POST", "/v1/sign", b'{"key": "nobody/here", "data": "YQ=="}', {}, 404, "unknown_key"),
    ("POST", "/v1/sign", b'{"items": []}', {}, 400, "invalid_request"),
    ("POST", "/v1/sign", b'{"items": [{"key": "a/b"}]}', {}, 400, "invalid_request"),
    (
        "POST",
        "/v1/sign",
        b'{"key": "a/b", "data": "YQ=="}',
        {"Content-Type": "text/plain"},
        415,
        "unsupported_media_type",
    ),
    (
        "POST",
        "/v1/verify",
        b'{"kid": "x", "data": "YQ==", "signature": "YQ=="}',
        {},
        401,
        "unknown_kid",
    ),
    (
        "POST",
        "/v1/verify",
        b'{"kid": "no.such.v1", "data": "YQ==", "signature": "YQ=="}',
        {},
        401,
        "unknown_kid",
    ),
    ("POST", "/v1/keys", b'{"key": "bad name"}', {}, 400, "invalid_key_name"),
    ("GET", "/v1/keys/nobody/here", None, {}, 404, "unknown_key"),
    ("GET", "/v1/keys/UP/x", None, {}, 400, "invalid_key_name"),
    ("GET", "/v1/kids/no.such.v1", None, {}, 404, "unknown_kid"),
    ("GET", "/v1/kids/not-a-kid", None, {}, 404, "unknown_kid"),
    ("GET", "/v1/nothing", None, {}, 404, "not_found"),
    ("DELETE", "/v1/sign", None, {}, 405, "method_not_allowed"),
    ("POST", "/v1/keys/nobody/here/versions/01/retire", b"{}", {}, 404, "unknown_version"),
    ("POST", "/v1/keys/nobody/here/versions/1/explode", b"{}", {}, 404, "not_found"),
    ("POST", "/v1/keys/nobody/here/rotate", b'{"pending": "yes"}', {}, 400, "invalid_request"),
    ("POST", "/v1/keys/nobody/here/rotate", b"{}", {}, 404, "unknown_key"),
]


@pytest.mark.parametrize(("method", "url", "raw", "headers", "status", "code"), BAD_INPUTS)
def test_bad_input_gets_its_code(
    api: Api,
    method: str,
    url: str,
    raw: bytes | None,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    """Each kind of bad input answers its own 4xx code in the error envelope with a request id."""
    reply = api(method, url, raw=raw, headers=headers)
    assert (reply.status, reply.code) == (status, code), reply.body
    err = reply.json["error"]
    assert err["request_id"] == reply.headers["x-request-id"]
    assert isinstance(err["message"], str) and err["message"]


def test_body_over_the_limit_is_413(api: Api) -> None:
    """A body over max_body_bytes answers payload_too_large."""
    raw = json.dumps({"key": "a/b", "data": b64(b"x" * (2 << 20))}).encode()
    reply = api("POST", "/v1/sign", raw=raw)
    assert (reply.status, reply.code) == (413, "payload_too_large")


def test_batch_over_the_limit_is_refused(api: Api, key: str) -> None:
    """More than max_batch_items items answers invalid_request."""
    items = [{"key": key, "data": "YQ=="}] * 257
    reply = api("POST", "/v1/sign", {"items": items})
    assert (reply.status, reply.code) == (400, "invalid_request")


def test_invalid_signature_is_401(api: Api, key: str) -> None:
    """A signature over other data answers invalid_signature, never valid:false."""
    s = api.ok("POST", "/v1/sign", {"key": key, "data": b64(b"one")})
    reply = api(
        "POST", "/v1/verify", {"kid": s["kid"], "data": b64(b"two"), "signature": s["signature"]}
    )
    assert (reply.status, reply.code) == (401, "invalid_signature")


def test_request_ids(api: Api) -> None:
    """Every response has X-Request-Id; a well-formed caller id is kept, a bad one replaced."""
    assert api("GET", "/v1/health").headers["x-request-id"]
    assert (
        api("GET", "/v1/health", headers={"X-Request-Id": "gw-123"}).headers["x-request-id"]
        == "gw-123"
    )
    bad = api("GET", "/v1/health", headers={"X-Request-Id": "x" * 200}).headers["x-request-id"]
    assert bad != "x" * 200 and len(bad) == 32


def test_health_ready_openapi(api: Api) -> None:
    """health and ready answer 200; openapi.json documents every route the server has."""
    assert api.ok("GET", "/v1/health") == {"status": "ok"}
    assert api.ok("GET", "/v1/ready") == {"status": "ready"}
    doc = api.ok("GET", "/v1/openapi.json")
    assert doc["openapi"].startswith("3.1")
    from signerd.federation._routes import ROUTES as FEDERATION_ROUTES
    from signerd.metrics._routes import ROUTES as METRICS_ROUTES
    from signerd.server._v1 import ROUTES

    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    served = {(m, p) for m, p, *_ in (*ROUTES, *FEDERATION_ROUTES, *METRICS_ROUTES)}
    assert served == documented


def test_random_bodies_never_500(api: Api, key: str) -> None:
    """Random and mutated bodies on every POST route answer a typed 4xx, never a 5xx."""
    rng = random.Random(1234)
    valid = json.dumps({"key": key, "data": "YQ=="}).encode()
    urls = [
        "/v1/sign",
        "/v1/verify",
        "/v1/keys",
        f"/v1/keys/{key}/rotate",
        f"/v1/keys/{key}/versions/1/retire",
    ]
    for _ in range(300):
        kind = rng.randrange(3)
        if kind == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        elif kind == 1:
            changed = bytearray(valid)
            for _ in range(rng.randrange(1, 4)):
                changed[rng.randrange(len(changed))] = rng.randrange(32, 127)
            raw = bytes(changed)
        else:
            raw = json.dumps(
                rng.choice([None, 1, "s", [], {"key": 1}, {"items": [1]}, {"kid": [], "data": {}}])
            ).encode()
        reply = api("POST", rng.choice(urls), raw=raw)
        assert reply.status < 500, (raw, reply.body)
        assert reply.code is not None or reply.status == 200


# --- Idempotency-Key on admin requests ------------------------------------------------


def _versions(api: Api, key: str) -> list[int]:
    return [v["version"] for v in api.ok("GET", f"/v1/keys/{key}")["versions"]]


@pytest.mark.parametrize("bad", ["", "x" * 65, "a b", "a/b", "key\u00e9", "a,b", '"quoted"'])
def test_a_malformed_idempotency_key_is_refused_before_anything(
    api: Api, key: str, bad: str
) -> None:
    """An Idempotency-Key outside 1-64 of [A-Za-z0-9._:-] is 400 invalid_request and the admin
    operation is not done (rotate and create alike)."""
    headers = {"Idempotency-Key": bad}
    reply = api("POST", f"/v1/keys/{key}/rotate", {}, headers=headers)
    assert (reply.status, reply.code) == (400, "invalid_request"), reply.body
    assert "Idempotency-Key" in reply.json["error"]["message"]
    assert not bad or bad not in reply.body.decode()  # never echoed
    fresh = f"{unique('idem')}/k"
    assert api("POST", "/v1/keys", {"key": fresh}, headers=headers).code == "invalid_request"
    assert api("GET", f"/v1/keys/{fresh}").code == "unknown_key"
    assert _versions(api, key) == [1]


def test_a_repeated_idempotency_key_answers_again_without_acting(
    api: Api, key: str, daemon: DaemonProcess
) -> None:
    """The same key for the same rotate answers the first answer again (Idempotent-Replayed)
    and rotates once; the same key for another request is 422 idempotency_key_reused; the
    trail records the replays as `replayed`, naming the kid and the first request."""
    k = unique("rot")
    first = api("POST", f"/v1/keys/{key}/rotate", {}, headers={"Idempotency-Key": k})
    assert first.status == 200 and "idempotent-replayed" not in first.headers
    for _ in range(4):  # fresh connections: both workers answer some
        again = api("POST", f"/v1/keys/{key}/rotate", {}, headers={"Idempotency-Key": k})
        assert again.status == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.json == first.json
    assert _versions(api, key) == [1, 2]
    other = f"{unique('idem')}/k"
    for method, url, body in [
        ("POST", f"/v1/keys/{key}/rotate", {"pending": True}),
        ("POST", "/v1/keys", {"key": other}),
        ("POST", f"/v1/keys/{key}/versions/1/retire", {}),
    ]:
        reply = api(method, url, body, headers={"Idempotency-Key": k})
        assert (reply.status, reply.code) == (422, "idempotency_key_reused"), reply.body
    assert _versions(api, key) == [1, 2]
    assert api("GET", f"/v1/keys/{other}").code == "unknown_key"
    rid = first.headers["x-request-id"]
    records = [r for r in daemon.audit_records() if r.get("key") == key]
    replays = [r for r in records if r["outcome"] == "replayed"]
    assert len(replays) == 4 and {r["kid"] for r in replays} == {first.json["kid"]}
    assert all(r["reason"] == f"replay of request {rid}" for r in replays)
    mine = [r["outcome"] for r in records if r["request_id"] == rid]
    assert mine == ["intent", "ok"]


def test_every_admin_operation_replays_its_answer(api: Api) -> None:
    """create, promote, retire and destroy repeated with their keys answer as the first time
    (a repeated create is 201 again, not key_exists) and change nothing more."""
    key = f"{unique('idem')}/k"
    tenant, name = key.split("/")
    steps: list[tuple[str, Any, int]] = [
        ("/v1/keys", {"key": key}, 201),
        (f"/v1/keys/{key}/rotate", {"pending": True}, 200),
        (f"/v1/keys/{key}/versions/2/promote", {}, 200),
        (f"/v1/keys/{key}/versions/1/retire", {}, 200),
        (
            f"/v1/keys/{key}/versions/1/destroy",
            {"confirm": f"{tenant}.{name}.v1", "now": True},
            200,
        ),
    ]
    for url, body, status in steps:
        headers = {"Idempotency-Key": unique("step")}
        first = api("POST", url, body, headers=headers)
        assert first.status == status, first.body
        again = api("POST", url, body, headers=headers)
        assert (again.status, again.json) == (status, first.json), again.body
        assert again.headers["idempotent-replayed"] == "true"
    states = [v["state"] for v in api.ok("GET", f"/v1/keys/{key}")["versions"]]
    assert states == ["destroyed", "active"]
