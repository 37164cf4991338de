"""Ed25519 public keys in their wire forms: RFC 8037 OKP JWK and PEM; RFC 7638 thumbprints."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._ed25519 import check_public

ED25519_PUBLIC_LEN = 32

# RFC 9864: "Ed25519" names the algorithm; "EdDSA" is deprecated but still all that
# some verifiers know. signerd writes the one configured and reads either.
JWK_ALGS = ("Ed25519", "EdDSA")
DEFAULT_JWK_ALG = "Ed25519"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    pad = "=" * (-len(text) % 4)
    return base64.urlsafe_b64decode(text + pad)


def to_jwk(kid: str, raw: bytes, alg: str = DEFAULT_JWK_ALG) -> dict[str, str]:
    """An RFC 8037 OKP JWK with ``alg`` (one of ``JWK_ALGS``) and ``use`` sig."""
    if alg not in JWK_ALGS:
        raise ValueError("alg must be Ed25519 or EdDSA")
    return {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url(raw),
        "kid": kid,
        "alg": alg,
        "use": "sig",
    }


def thumbprint(raw: bytes) -> str:
    """The RFC 7638 thumbprint (SHA-256, unpadded base64url) of an Ed25519 public key."""
    # the required members in lexicographic order, no whitespace (RFC 7638 section 3.2)
    text = f'{{"crv":"Ed25519","kty":"OKP","x":"{b64url(raw)}"}}'
    return b64url(hashlib.sha256(text.encode("ascii")).digest())


def from_jwk(jwk: dict[str, Any]) -> tuple[str, Ed25519PublicKey]:
    """Parse an OKP Ed25519 JWK (``alg`` absent, Ed25519 or EdDSA); raise ValueError when it
    is not one, or when its key is a small-order or non-canonical point
    (``_ed25519.check_public``)."""
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise ValueError("not an OKP Ed25519 JWK")
    if jwk.get("alg", DEFAULT_JWK_ALG) not in JWK_ALGS:
        raise ValueError("JWK alg is neither Ed25519 nor EdDSA")
    kid, x = jwk.get("kid"), jwk.get("x")
    if not isinstance(kid, str) or not isinstance(x, str):
        raise ValueError("JWK lacks kid or x")
    raw = b64url_decode(x)
    if len(raw) != ED25519_PUBLIC_LEN:
        raise ValueError("JWK x is not 32 bytes")
    return kid, Ed25519PublicKey.from_public_bytes(check_public(raw))


def to_pem(raw: bytes) -> str:
    key = Ed25519PublicKey.from_public_bytes(raw)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")
