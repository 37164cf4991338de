"""The [federation] configuration and trusted peer keys from files, across restarts."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signerd._config import ConfigError, parse
from signerd.federation._settings import parse_federation
from signerd.federation._trust import PeerKey

from ..conftest import daemon_config, unique
from ..support.federation import Api, Producer, federation_daemon


def test_defaults(tmp_path: Path) -> None:
    """Defaults: skew 300 s, TTL twice the skew, SQLite under the state directory."""
    s = parse_federation({}, str(tmp_path))
    assert (s.skew, s.nonce_ttl, s.store) == (300, 600, "sqlite")
    assert s.state_dir == str(tmp_path / "state")
    assert s.sqlite_path == str(tmp_path / "state" / "nonces.sqlite3")
    assert parse_federation({"skew": 10}, str(tmp_path)).nonce_ttl == 20


def test_nonce_bounds_and_sharing_defaults(tmp_path: Path) -> None:
    """A tenant may hold a quarter of max_entries unless told otherwise; keys are not shared."""
    s = parse_federation({}, str(tmp_path))
    assert (s.max_entries, s.max_entries_per_tenant, s.allow_shared_keys) == (
        1_000_000,
        250_000,
        False,
    )
    s = parse_federation({"nonces": {"max_entries": 40}}, str(tmp_path))
    assert (s.max_entries, s.max_entries_per_tenant) == (40, 10)
    s = parse_federation(
        {"allow_shared_keys": True, "nonces": {"max_entries": 40, "max_entries_per_tenant": 40}},
        str(tmp_path),
    )
    assert (s.max_entries_per_tenant, s.allow_shared_keys) == (40, True)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"skew": 300, "nonce_ttl": 599}, "federation.nonce_ttl: must be at least 2 * skew"),
        ({"skew": 0}, "federation.skew: must be a positive int"),
        ({"skew": True}, "federation.skew"),
        ({"nonse_ttl": 1}, "federation.nonse_ttl: unknown key"),
        ({"nonces": {"store": "memcached"}}, "federation.nonces.store"),
        ({"nonces": {"url": "http://x"}}, "federation.nonces.url"),
        ({"nonces": {"max_entries": -1}}, "federation.nonces.max_entries"),
        (
            {"nonces": {"max_entries": 10, "max_entries_per_tenant": 11}},
            "federation.nonces.max_entries_per_tenant: at most max_entries",
        ),
        ({"nonces": {"max_entries_per_tenant": 0}}, "federation.nonces.max_entries_per_tenant"),
        ({"allow_shared_keys": 1}, "federation.allow_shared_keys: must be true or false"),
        ({"trusted_keys": [{"tenant": "a", "kid": "k"}]}, "exactly one of jwk_file, pem_file"),
        ({"trusted_keys": [{"tenant": "A", "kid": "k", "pem_file": "x"}]}, ".tenant"),
        ({"trusted_keys": [{"tenant": "a", "kid": "k|1", "pem_file": "x"}]}, ".kid"),
        ({"trusted_keys": [{"tenant": "a", "kid": "k", "pem_file": "missing.pem"}]}, "cannot read"),
    ],
)
def test_invalid_tables_name_the_key(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    """Each invalid [federation] value is a configuration error naming its key."""
    doc = daemon_config(tmp_path, federation=table)
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("*", r"\*")):
        parse(doc, path=str(tmp_path / "signerd.toml"))


def test_trusted_keys_from_jwk_and_pem_files(tmp_path: Path) -> None:
    """Configured peer keys (JWK file and PEM file) verify; a wrong-type PEM is refused at load."""
    jwk_producer, pem_producer = Producer.new("p-jwk"), Producer.new("p-pem")
    (tmp_path / "p.jwk").write_text(json.dumps({**jwk_producer.jwk(), "kid": "p-jwk"}))
    pem = pem_producer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "p.pem").write_bytes(pem)
    tenant = unique("cf")
    peers = [
        {"tenant": tenant, "kid": "p-jwk", "jwk_file": str(tmp_path / "p.jwk")},
        {"tenant": tenant, "kid": "p-pem", "pem_file": str(tmp_path / "p.pem")},
    ]
    base = tmp_path / "d"
    d = federation_daemon(base, {"trusted_keys": peers})
    try:
        api = Api(d)
        for p in (jwk_producer, pem_producer):
            api.ok("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
        listed = api.ok("GET", f"/v1/trusted-keys?tenant={tenant}")["keys"]
        assert [(k["kid"], k["source"], k["state"]) for k in listed] == [
            ("p-jwk", "config", "active"),
            ("p-pem", "config", "active"),
        ]
        api.ok("POST", f"/v1/trusted-keys/{tenant}/p-pem/retire")
        added = Producer.new("p-api")
        api.trust(tenant, added)
    finally:
        d.stop()
    assert not [p.name for p in (base / "state").iterdir() if ".tmp" in p.name]
    d = federation_daemon(base, {"trusted_keys": peers})
    try:
        api = Api(d)
        reply = api("POST", "/v1/telemetry/verify", pem_producer.telemetry(tenant, b"{}"))
        assert (reply.status, reply.code) == (401, "retired_kid")  # retirement outlives restarts
        api.ok("POST", "/v1/telemetry/verify", added.telemetry(tenant, b"{}"))
        api.ok("POST", "/v1/telemetry/verify", jwk_producer.telemetry(tenant, b"{}"))
    finally:
        d.stop()


def test_non_ed25519_pem_is_a_config_error(tmp_path: Path) -> None:
    """A PEM holding another key type is refused when the configuration is loaded."""
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pem").write_bytes(pem)
    table = {"trusted_keys": [{"tenant": "a", "kid": "k", "pem_file": str(tmp_path / "ec.pem")}]}
    with pytest.raises(ConfigError, match=r"trusted_keys\[0\]\.pem_file: not an Ed25519"):
        parse(daemon_config(tmp_path, federation=table), path=str(tmp_path / "signerd.toml"))


IDENTITY_X = "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # the identity point: order 1
ORDER_8 = "JuiVj8KyJ7BFw_SJ8u-Y8NXfrAXTxjM5sTgCiG1T_AU"
NON_CANONICAL_IDENTITY = "7v_______________________________________38"  # y = p + 1


@pytest.mark.parametrize("x", [IDENTITY_X, ORDER_8, NON_CANONICAL_IDENTITY])
@pytest.mark.parametrize("form", ["jwk_file", "pem_file"])
def test_weak_configured_keys_are_config_errors(tmp_path: Path, x: str, form: str) -> None:
    """A small-order or non-canonical key in a jwk_file or pem_file stops the configuration."""
    raw = base64.urlsafe_b64decode(x + "=")
    if form == "jwk_file":
        (tmp_path / "peer").write_text(json.dumps({"kty": "OKP", "crv": "Ed25519", "x": x}))
    else:
        der = bytes.fromhex("302a300506032b6570032100") + raw
        text = base64.encodebytes(der).decode()
        (tmp_path / "peer").write_text(
            f"-----BEGIN PUBLIC KEY-----\n{text}-----END PUBLIC KEY-----\n"
        )
    table = {"trusted_keys": [{"tenant": "a", "kid": "k", form: str(tmp_path / "peer")}]}
    with pytest.raises(ConfigError, match=rf"trusted_keys\[0\]\.{form}: .*acceptable Ed25519"):
        parse(daemon_config(tmp_path, federation=table), path=str(tmp_path / "signerd.toml"))


def test_one_key_for_two_tenants_needs_allow_shared_keys(tmp_path: Path) -> None:
    """Configuring one public key for two tenants is an error unless allow_shared_keys is on;
    the same key under two kids of one tenant is allowed."""
    p = Producer.new("p-twice")
    (tmp_path / "p.jwk").write_text(json.dumps(p.jwk()))
    path = str(tmp_path / "p.jwk")
    two_tenants = [
        {"tenant": "a", "kid": "k1", "jwk_file": path},
        {"tenant": "b", "kid": "k2", "jwk_file": path},
    ]
    with pytest.raises(ConfigError, match=r"trusted_keys\[1\]: .*allow_shared_keys = true"):
        parse_federation_doc(tmp_path, {"trusted_keys": two_tenants})
    allowed = parse_federation_doc(
        tmp_path, {"trusted_keys": two_tenants, "allow_shared_keys": True}
    )
    assert [(k.tenant, k.kid) for k in allowed] == [("a", "k1"), ("b", "k2")]
    two_kids = [{**two_tenants[0]}, {**two_tenants[1], "tenant": "a"}]
    assert len(parse_federation_doc(tmp_path, {"trusted_keys": two_kids})) == 2


def parse_federation_doc(tmp_path: Path, table: dict[str, object]) -> list[PeerKey]:
    config = parse(daemon_config(tmp_path, federation=table), path=str(tmp_path / "signerd.toml"))
    return list(config.federation.trusted)


@pytest.mark.timeout(120)
def test_key_trusted_for_two_tenants_by_file_and_config_verifies_for_neither(
    tmp_path: Path,
) -> None:
    """A key the API trusted for one tenant, then configured for another, verifies for neither
    (409 shared_peer_key, logged) until the conflict is removed."""
    p = Producer.new("p-conflict")
    first, second = unique("ca"), unique("cb")
    base = tmp_path / "d"
    d = federation_daemon(base)
    try:
        api = Api(d)
        api.trust(first, p)
        api.ok("POST", "/v1/telemetry/verify", p.telemetry(first, b"{}"))
    finally:
        d.stop()
    (tmp_path / "p.jwk").write_text(json.dumps(p.jwk()))
    peers = [{"tenant": second, "kid": p.kid, "jwk_file": str(tmp_path / "p.jwk")}]
    d = federation_daemon(base, {"trusted_keys": peers})
    try:
        api = Api(d)
        for tenant in (first, second):
            reply = api("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
            assert (reply.status, reply.code) == (409, "shared_peer_key"), reply.body
        entries = ",".join(sorted(f"{t}/{p.kid}" for t in (first, second)))
        assert f"signerd.trusted_key_shared entries={entries} verifying=none" in d.log_text()
    finally:
        d.stop()
    d = federation_daemon(base)  # the configuration no longer names the key: it verifies again
    try:
        Api(d).ok("POST", "/v1/telemetry/verify", p.telemetry(first, b"{}"))
    finally:
        d.stop()


def test_weak_key_in_trusted_keys_json_is_never_trusted(tmp_path: Path) -> None:
    """A trusted-keys.json record holding a small-order key makes the store unreadable (503)."""
    from signerd.errors import BackendUnavailable
    from signerd.federation._trust import TrustedKeys

    record = {"tenant": "a", "kid": "k", "x": IDENTITY_X, "state": "active"}
    (tmp_path / "trusted-keys.json").write_text(json.dumps({"v": 1, "keys": [record]}))
    trusted = TrustedKeys(str(tmp_path))
    with pytest.raises(BackendUnavailable):
        trusted.lookup("a", "k")
    record["x"] = Producer.new("k").jwk()["x"]
    (tmp_path / "trusted-keys.json").write_text(json.dumps({"v": 1, "keys": [record]}))
    assert trusted.lookup("a", "k")[0].kid == "k"
