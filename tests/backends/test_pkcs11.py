"""The PKCS#11 backend on a real SoftHSM token: what the token itself says about the keys."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pkcs11 import KeyType

from signerd.backends.pkcs11._backend import Pkcs11Backend, from_config
from signerd.wire._names import KeyName

from ..conftest import pkcs11_backend_config, unique


@pytest.fixture
def backend() -> Iterator[Pkcs11Backend]:
    b = from_config(pkcs11_backend_config())
    yield b
    b.close()


def test_private_keys_read_back_sensitive_and_never_extractable(backend: Pkcs11Backend) -> None:
    """Every private key made by create and rotate reads back from the token as a sensitive,
    non-extractable, private token object, generated there and never extractable."""
    key = KeyName(unique("p11"), "attrs")
    info = backend.create(key)
    backend.rotate(key, pending=False)
    info = backend.rotate(key, pending=True)
    kids = [v.kid for v in info.versions]
    assert kids == [key.kid(1), key.kid(2), key.kid(3)]
    for kid in kids:
        attrs = backend.private_key_attributes(kid)
        assert attrs["TOKEN"] is True, (kid, attrs)
        assert attrs["PRIVATE"] is True, (kid, attrs)
        assert attrs["SENSITIVE"] is True, (kid, attrs)
        assert attrs["EXTRACTABLE"] is False, (kid, attrs)
        assert attrs["KEY_TYPE"] == KeyType.EC_EDWARDS, (kid, attrs)
        # generated on the token, sensitive and unextractable from the start (SoftHSM reports
        # all three; a token that did not would fail here rather than pass by omission)
        assert attrs["LOCAL"] is True, (kid, attrs)
        assert attrs["ALWAYS_SENSITIVE"] is True, (kid, attrs)
        assert attrs["NEVER_EXTRACTABLE"] is True, (kid, attrs)
