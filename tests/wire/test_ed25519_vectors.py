"""RFC 8032 section 7.1 known-answer vectors through signerd's verify path; which keys enter."""

from __future__ import annotations

import base64

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.errors import InvalidRequest
from signerd.federation._trust import jwk_public, pem_public
from signerd.wire import check_public, from_jwk, thumbprint, to_jwk, to_pem, weakness

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


# The eight points of small order, canonically encoded (identity, order 2, two of order 4,
# four of order 8): a key among them verifies forged signatures.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
]
_P = 2**255 - 19
# Non-canonical encodings: every y >= p (p + 0 .. p + 18, among them y = p + 1, the identity,
# and y = p, of order 4), with either sign bit; and the sign bit set on the two points whose
# x is 0 (the identity and the point of order 2).
NON_CANONICAL = [
    ((_P + k) | (sign << 255)).to_bytes(32, "little").hex() for k in range(19) for sign in (0, 1)
] + [
    "0100000000000000000000000000000000000000000000000000000000000080",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff",
]
WEAK = SMALL_ORDER + NON_CANONICAL
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SubjectPublicKeyInfo, Ed25519


def _pem(raw: bytes) -> bytes:
    body = base64.encodebytes(_SPKI_PREFIX + raw).decode().replace("\n", "")
    return f"-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n".encode()


@pytest.mark.parametrize("encoded", WEAK)
def test_small_order_and_non_canonical_keys_are_refused_everywhere(encoded: str) -> None:
    """Each small-order or non-canonical encoding is refused as JWK, trusted-key JWK and PEM."""
    raw = bytes.fromhex(encoded)
    assert weakness(raw) is not None
    with pytest.raises(ValueError, match="not an acceptable Ed25519 public key"):
        check_public(raw)
    with pytest.raises(ValueError, match="not an acceptable Ed25519 public key"):
        from_jwk(to_jwk("peer", raw))
    with pytest.raises(InvalidRequest, match="not an acceptable Ed25519 key"):
        jwk_public({"kty": "OKP", "crv": "Ed25519", "x": to_jwk("peer", raw)["x"]}, "peer")
    with pytest.raises(ValueError, match="not an acceptable Ed25519 public key"):
        pem_public(_pem(raw))


def test_weak_key_reasons() -> None:
    """The reasons: small order for the eight points, y >= p, and a sign bit with x = 0."""
    assert {weakness(bytes.fromhex(h)) for h in SMALL_ORDER} == {"a point of small order"}
    assert weakness((_P + 1).to_bytes(32, "little")) == "non-canonical encoding (y >= p)"
    assert weakness(bytes.fromhex(NON_CANONICAL[-1])) == (
        "non-canonical encoding (sign bit set with x = 0)"
    )
    assert weakness((2).to_bytes(32, "little")) == "not a point on the curve"
    assert weakness(b"\x01" * 31) == "not 32 bytes"


def test_good_keys_are_accepted() -> None:
    """The RFC 8032 keys and 300 generated keys pass the check, as JWK and as PEM."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    generated = [Ed25519PrivateKey.generate().public_key().public_bytes_raw() for _ in range(300)]
    for raw in [bytes.fromhex(v[0]) for v in VECTORS] + generated:
        assert weakness(raw) is None
        assert check_public(raw) == raw
        assert from_jwk(to_jwk("k", raw))[1].public_bytes_raw() == raw
        assert pem_public(_pem(raw)) == raw
        assert jwk_public({"kty": "OKP", "crv": "Ed25519", "x": to_jwk("k", raw)["x"]}, "k") == raw


def test_rfc7638_thumbprint() -> None:
    """The thumbprint of the RFC 8032 TEST 1 key is RFC 8037 appendix A.3's."""
    raw = bytes.fromhex(VECTORS[0][0])
    assert thumbprint(raw) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
