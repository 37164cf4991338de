"""The [federation] configuration and trusted peer keys from files, across restarts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from signerd._config import ConfigError, parse
from signerd.federation.settings import parse_federation

from ._federation import Api, Producer, federation_daemon
from .conftest import daemon_config, unique


def test_defaults(tmp_path: Path) -> None:
    """Defaults: skew 300 s, TTL twice the skew, SQLite under the state directory."""
    s = parse_federation({}, str(tmp_path))
    assert (s.skew, s.nonce_ttl, s.store) == (300, 600, "sqlite")
    assert s.state_dir == str(tmp_path / "state")
    assert s.sqlite_path == str(tmp_path / "state" / "nonces.sqlite3")
    assert parse_federation({"skew": 10}, str(tmp_path)).nonce_ttl == 20


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
