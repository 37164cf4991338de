"""The gateway's pinned keys (StaticKeys) accept JWKs with alg Ed25519 or EdDSA."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.gateway import StaticKeys
from signerd.wire import JWK_ALGS, to_jwk


@pytest.mark.parametrize("alg", JWK_ALGS)
def test_static_keys_accept_either_alg(alg: str) -> None:
    """A pinned JWK with alg Ed25519 or EdDSA resolves to its tenant and key."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    keys = StaticKeys({"acme": [to_jwk("acme.k.v1", raw, alg)]})
    tenant, public = asyncio.run(keys.resolve("acme.k.v1"))
    assert (tenant, public.public_bytes_raw()) == ("acme", raw)


def test_static_keys_refuse_another_alg() -> None:
    """A pinned JWK whose alg is not an Ed25519 name is refused at start."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(ValueError):
        StaticKeys({"acme": [{**to_jwk("acme.k.v1", raw), "alg": "ES256"}]})
