"""JWK ``alg``: signerd writes Ed25519 (RFC 9864) or EdDSA, and reads either."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.wire import JWK_ALGS, from_jwk, to_jwk

RAW = Ed25519PrivateKey.generate().public_key().public_bytes_raw()


def test_to_jwk_writes_ed25519_by_default_and_refuses_other_algs() -> None:
    """to_jwk writes alg Ed25519 unless told EdDSA, and refuses any other alg."""
    assert to_jwk("t.k.v1", RAW)["alg"] == "Ed25519"
    assert to_jwk("t.k.v1", RAW, "EdDSA")["alg"] == "EdDSA"
    with pytest.raises(ValueError):
        to_jwk("t.k.v1", RAW, "ES256")


@pytest.mark.parametrize("alg", [*JWK_ALGS, None])
def test_from_jwk_reads_both_algs_and_none(alg: str | None) -> None:
    """from_jwk reads a JWK with alg Ed25519, EdDSA, or no alg."""
    jwk = to_jwk("t.k.v1", RAW, "Ed25519")
    if alg is None:
        del jwk["alg"]
    else:
        jwk["alg"] = alg
    kid, public = from_jwk(jwk)
    assert (kid, public.public_bytes_raw()) == ("t.k.v1", RAW)


@pytest.mark.parametrize("alg", ["ES256", "ed25519", "", "EdDSA ", 1])
def test_from_jwk_refuses_other_algs(alg: object) -> None:
    """from_jwk refuses a JWK whose alg is neither Ed25519 nor EdDSA (exactly)."""
    jwk: dict[str, object] = {**to_jwk("t.k.v1", RAW), "alg": alg}
    with pytest.raises(ValueError):
        from_jwk(jwk)
