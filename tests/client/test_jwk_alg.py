"""The client's key cache reads JWKS entries with alg Ed25519 or EdDSA."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.client._keycache import KeyCache
from signerd.wire import JWK_ALGS, to_jwk


@pytest.mark.parametrize("alg", JWK_ALGS)
def test_key_cache_holds_keys_of_either_alg(alg: str) -> None:
    """A JWKS whose keys say alg Ed25519 or EdDSA fills the cache with those keys."""
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    cache = KeyCache(ttl=60.0, refetch_interval=1.0)
    cache.replace("t", [to_jwk("t.k.v1", raw, alg), {**to_jwk("t.k.v2", raw), "alg": "RS256"}])
    found = cache.get("t", "t.k.v1")
    assert found is not None and found.public_bytes_raw() == raw
    assert cache.get("t", "t.k.v2") is None
