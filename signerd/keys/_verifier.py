"""Checking an Ed25519 signature against a cached public key.

Every signature signerd makes is checked before it leaves, and ``/v1/verify``
checks the caller's: both on a worker's loop, once a request. With PyNaCl
installed (the ``sodium`` extra) the check is libsodium's; without it,
``cryptography``'s. libsodium's takes about 40 µs here against about 62 µs
(``docs/benchmarks.md``), and it is the stricter of the two: it refuses a
public key of small order, which ``cryptography`` accepts together with a
signature any caller can make for any payload. A token never returns such a
key; a check that would pass one is not a check.

Both raise ``cryptography``'s ``InvalidSignature`` for a signature that does
not verify, so callers handle one exception whichever checks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import BackendError, SignerdError

__all__ = ["SODIUM", "Verifier", "checked_signatures", "verifier"]

try:
    from nacl.bindings import crypto_sign_open
    from nacl.exceptions import BadSignatureError
except ImportError:  # the sodium extra is not installed: cryptography checks
    SODIUM = False
else:
    SODIUM = True

log = logging.getLogger("signerd.keys")


class Verifier(Protocol):
    def verify(self, signature: bytes, data: bytes, /) -> None:
        """Return when ``signature`` is valid over ``data``; raise InvalidSignature."""


class _Sodium:
    """libsodium's check (``crypto_sign_open``: the signature, then the signed data)."""

    __slots__ = ("_key",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ValueError("an Ed25519 public key is 32 bytes")
        self._key = bytes(raw)

    def verify(self, signature: bytes, data: bytes, /) -> None:
        if len(signature) != 64:
            raise InvalidSignature()
        try:
            crypto_sign_open(b"".join((signature, data)), self._key)  # any bytes-like
        except BadSignatureError:
            raise InvalidSignature() from None


def verifier(raw: bytes, *, sodium: bool = SODIUM) -> Verifier:
    """The checker for the raw 32-byte public key ``raw`` (ValueError when it is not one)."""
    if sodium:
        return _Sodium(raw)
    return Ed25519PublicKey.from_public_bytes(raw)


def checked_signatures(
    public: Verifier, kid: str, items: Sequence[bytes], results: Sequence[bytes | SignerdError]
) -> list[bytes | SignerdError]:
    """``results`` (a backend's signatures of ``items`` with ``kid``, or errors in place),
    each signature checked: one that does not verify becomes a BackendError (logged)."""
    out: list[bytes | SignerdError] = []
    for data, result in zip(items, results, strict=True):
        if isinstance(result, bytes):
            try:
                public.verify(result, data)
            except InvalidSignature:
                log.error("signerd.signature_check_failed kid=%s", kid)
                result = BackendError("the backend produced a signature that does not verify")
        out.append(result)
    return out
