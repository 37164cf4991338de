"""A PKCS#11 backend tells, without a search, whether the keys it listed last changed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from signerd.backends import Revalidating
from signerd.backends.pkcs11 import Pkcs11Backend, from_config
from signerd.wire import KeyName

from ..conftest import ROOT, pkcs11_backend_config, unique

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def backend() -> Iterator[Pkcs11Backend]:
    b = from_config(pkcs11_backend_config())
    yield b
    b.close()


def _rotate_elsewhere(key: KeyName) -> None:
    """Rotate ``key`` from another process, as another daemon on the token would."""
    code = (
        "import sys; from signerd.backends.pkcs11 import from_config; "
        "from signerd.wire import KeyName; "
        f"b = from_config({pkcs11_backend_config()!r}); "
        f"b.rotate(KeyName({key.tenant!r}, {key.name!r}), pending=False); b.close()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=30)


def test_unchanged_until_a_listed_key_changes_here_or_in_another_process(
    backend: Pkcs11Backend,
) -> None:
    """No listing yet: not known unchanged; after one, unchanged; after a rotation by this
    process or another one, changed until the next full listing."""
    assert isinstance(backend, Revalidating)
    key = KeyName(unique("rv"), "k")
    backend.create(key)
    assert not backend.unchanged()  # nothing listed yet: list in full
    backend.list_keys()
    assert backend.unchanged() and backend.unchanged()
    backend.rotate(key, pending=False)
    assert not backend.unchanged()
    backend.list_keys()
    assert backend.unchanged()
    _rotate_elsewhere(key)
    assert not backend.unchanged()  # the old metadata object is gone
    listed = {i.key: i for i in backend.list_keys()}
    assert [v.version for v in listed[key].versions] == [1, 2, 3]
    assert backend.unchanged()
