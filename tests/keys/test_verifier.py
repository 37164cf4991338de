"""The signature check of the key service: libsodium's, or cryptography's without PyNaCl."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.keys._verifier import SODIUM, verifier

# RFC 8032 section 7.1, TEST 2: (public key, message, signature)
PUBLIC = bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
MESSAGE = bytes.fromhex("72")
SIGNATURE = bytes.fromhex(
    "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
    "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
)
#: the identity point: a key of small order, and the signature it accepts for any message
IDENTITY = b"\x01" + bytes(31)
FORGED = IDENTITY + bytes(32)
BOTH = pytest.mark.parametrize("sodium", [True, False], ids=["libsodium", "cryptography"])


def test_the_test_environment_checks_with_libsodium() -> None:
    """make test installs the sodium extra: the daemon under test checks with libsodium."""
    assert SODIUM
    assert type(verifier(PUBLIC)).__name__ == "_Sodium"


@BOTH
def test_a_known_answer_verifies_and_a_changed_one_does_not(sodium: bool) -> None:
    check = verifier(PUBLIC, sodium=sodium)
    check.verify(SIGNATURE, MESSAGE)
    flipped = bytearray(SIGNATURE)
    flipped[10] ^= 1
    for signature, message in ((bytes(flipped), MESSAGE), (SIGNATURE, b"\x73")):
        with pytest.raises(InvalidSignature):
            check.verify(signature, message)


@BOTH
@pytest.mark.parametrize("length", [0, 63, 65])
def test_a_signature_of_the_wrong_length_is_invalid(sodium: bool, length: int) -> None:
    with pytest.raises(InvalidSignature):
        verifier(PUBLIC, sodium=sodium).verify((SIGNATURE * 2)[:length], MESSAGE)


@BOTH
def test_a_key_of_the_wrong_length_is_refused(sodium: bool) -> None:
    with pytest.raises(ValueError):
        verifier(PUBLIC[:31], sodium=sodium)


@BOTH
def test_signatures_made_with_a_fresh_key_verify(sodium: bool) -> None:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes_raw()
    check = verifier(raw, sodium=sodium)
    for size in (0, 1, 64, 70_000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        check.verify(private.sign(data), data)
        # any bytes-like signature and payload, as cryptography's check takes them
        check.verify(bytearray(private.sign(data)), memoryview(data))  # type: ignore[arg-type]


def test_libsodium_refuses_the_forgery_a_small_order_key_allows() -> None:
    """The identity as the key: cryptography accepts ``01 00..00 || 00..00`` for any message;
    libsodium refuses it, so a backend returning such a key gets no signature past the check."""
    verifier(IDENTITY, sodium=False).verify(FORGED, b"any message at all")
    with pytest.raises(InvalidSignature):
        verifier(IDENTITY, sodium=True).verify(FORGED, b"any message at all")
