"""RFC 8032 section 7.1 known-answer vectors through signerd's verify path."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd._jwk import from_jwk, to_jwk, to_pem

# (public key, message, signature) from RFC 8032, TEST 1, 2, 3 and SHA(abc)
VECTORS = [
    (
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
        "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
    ),
    (
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
        "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
    ),
    (
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
        "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a",
    ),
]


@pytest.mark.parametrize(("public", "message", "signature"), VECTORS)
def test_rfc8032_vectors_verify_through_jwk(public: str, message: str, signature: str) -> None:
    """A public key published as an RFC 8037 JWK verifies the RFC 8032 signature and rejects a flipped bit."""
    jwk = to_jwk("t.k.v1", bytes.fromhex(public))
    assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519" and "=" not in jwk["x"]
    kid, key = from_jwk(jwk)
    assert kid == "t.k.v1"
    key.verify(bytes.fromhex(signature), bytes.fromhex(message))
    bad = bytearray(bytes.fromhex(signature))
    bad[0] ^= 1
    with pytest.raises(InvalidSignature):
        key.verify(bytes(bad), bytes.fromhex(message))


def test_pem_round_trips() -> None:
    """The PEM form carries the same 32-byte key."""
    raw = bytes.fromhex(VECTORS[0][0])
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        PublicFormat,
        load_pem_public_key,
    )

    loaded = load_pem_public_key(to_pem(raw).encode())
    assert isinstance(loaded, Ed25519PublicKey)
    assert loaded.public_bytes(Encoding.Raw, PublicFormat.Raw) == raw
