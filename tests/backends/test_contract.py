"""The backend contract: every backend (SoftHSM via PKCS#11, OpenBao transit) keeps it."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.backends import Backend, Destroyer, VersionState, backend_type, load_factory
from signerd.errors import KeyExists, NotSupported, SignerdError, UnknownKey, UnknownVersion
from signerd.wire import KeyName

from ..conftest import pkcs11_backend_config, unique

BackendMaker = Callable[[], Backend]


@pytest.fixture(scope="module", params=["pkcs11", "vault"])
def make_backend(request: pytest.FixtureRequest) -> Iterator[BackendMaker]:
    """A factory of backend instances that all point at one store."""
    config: dict[str, Any]
    if request.param == "pkcs11":
        config = pkcs11_backend_config()
    else:
        config = request.getfixturevalue("openbao_backend_config")
    made: list[Backend] = []

    def make() -> Backend:
        backend = load_factory(str(config["type"]))(config)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(make_backend: BackendMaker) -> Backend:
    return make_backend()


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("ct"), "feedback")


def _verifies(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except Exception:
        return False
    return True


def test_create_makes_version_one_active(backend: Backend, key: KeyName) -> None:
    """create gives exactly one version, v1, active, with a 32-byte public key and its kid."""
    info = backend.create(key)
    assert [(v.version, v.state, v.kid) for v in info.versions] == [
        (1, VersionState.ACTIVE, key.kid(1))
    ]
    assert len(info.versions[0].public_key) == 32
    assert info.versions[0].created_at > 1_700_000_000


def test_create_twice_is_key_exists(backend: Backend, key: KeyName) -> None:
    """Creating a key that exists raises KeyExists and leaves it unchanged."""
    first = backend.create(key)
    with pytest.raises(KeyExists):
        backend.create(key)
    assert backend.describe(key) == first


def test_describe_unknown_is_unknown_key(backend: Backend) -> None:
    """Describing a key that does not exist raises UnknownKey."""
    with pytest.raises(UnknownKey):
        backend.describe(KeyName(unique("ct"), "missing"))


def test_sign_verifies_under_the_version_public_key(backend: Backend, key: KeyName) -> None:
    """Signatures are Ed25519 over the exact bytes, valid under the named version's public key."""
    info = backend.create(key)
    data = [b"", b"hello", bytes(range(256)) * 40]
    sigs = backend.sign(key, 1, data)
    assert len(sigs) == 3
    for item, sig in zip(data, sigs, strict=True):
        assert isinstance(sig, bytes) and len(sig) == 64
        assert _verifies(info.versions[0].public_key, sig, item)
    assert isinstance(sigs[1], bytes)
    assert not _verifies(info.versions[0].public_key, sigs[1], b"hellO")


def test_rotate_makes_new_active_and_old_verify_only(backend: Backend, key: KeyName) -> None:
    """rotate adds v2 active and turns v1 verify-only in the same step."""
    backend.create(key)
    info = backend.rotate(key, pending=False)
    assert [(v.version, v.state) for v in info.versions] == [
        (1, VersionState.VERIFY_ONLY),
        (2, VersionState.ACTIVE),
    ]
    assert info.versions[0].public_key != info.versions[1].public_key
    assert backend.describe(key) == info


def test_rotate_pending_keeps_active_until_promoted(backend: Backend, key: KeyName) -> None:
    """A pending rotation publishes v2 without signing with it; promotion swaps active."""
    backend.create(key)
    info = backend.rotate(key, pending=True)
    assert [v.state for v in info.versions] == [VersionState.ACTIVE, VersionState.PENDING]
    info = backend.set_state(key, 2, VersionState.ACTIVE)
    assert [v.state for v in info.versions] == [VersionState.VERIFY_ONLY, VersionState.ACTIVE]


def test_retire_is_persisted(backend: Backend, key: KeyName) -> None:
    """A retired state is stored in the backend and read back by describe."""
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, VersionState.RETIRED)
    assert backend.describe(key).versions[0].state is VersionState.RETIRED


def test_destroy_removes_material_but_keeps_the_kid(backend: Backend, key: KeyName) -> None:
    """After destroy the version cannot sign, but its kid and public key are still described."""
    if not isinstance(backend, Destroyer):
        pytest.fail("every shipped backend supports destroy")
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, VersionState.RETIRED)
    info = backend.destroy(key, 1)
    v1 = info.versions[0]
    assert (v1.kid, v1.state) == (key.kid(1), VersionState.DESTROYED)
    assert len(v1.public_key) == 32
    with pytest.raises(SignerdError):
        backend.sign(key, 1, [b"x"])
    assert isinstance(backend.sign(key, 2, [b"x"])[0], bytes)


def test_versions_are_never_reused(backend: Backend, key: KeyName) -> None:
    """Version numbers only grow, also after a destroy."""
    if not isinstance(backend, Destroyer):
        pytest.fail("every shipped backend supports destroy")
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, VersionState.RETIRED)
    backend.destroy(key, 1)
    info = backend.rotate(key, pending=False)
    assert [v.version for v in info.versions] == [1, 2, 3]


def test_sign_unknown_version_fails(backend: Backend, key: KeyName) -> None:
    """Signing with a version the key does not have raises a typed error."""
    backend.create(key)
    with pytest.raises((UnknownVersion, SignerdError)):
        backend.sign(key, 7, [b"x"])


def test_two_instances_see_one_keyring(make_backend: BackendMaker, key: KeyName) -> None:
    """State lives in the store: a second instance sees the first one's rotation at once."""
    a, b = make_backend(), make_backend()
    a.create(key)
    assert b.describe(key).versions[0].state is VersionState.ACTIVE
    a.rotate(key, pending=False)
    seen = b.describe(key)
    assert [v.state for v in seen.versions] == [VersionState.VERIFY_ONLY, VersionState.ACTIVE]
    assert seen == a.describe(key)


def test_list_keys_includes_created_keys(backend: Backend) -> None:
    """list_keys returns every key in the store with its versions."""
    tenant = unique("ct")
    names = [KeyName(tenant, "a"), KeyName(tenant, "b")]
    for name in names:
        backend.create(name)
    listed = {info.key: info for info in backend.list_keys()}
    for name in names:
        assert listed[name].versions[0].kid == name.kid(1)


def test_check_passes_on_a_healthy_store(backend: Backend) -> None:
    """check() returns quietly when the store is reachable and logged in."""
    backend.check()


def test_registry_parse_refuses_a_misspelt_key_without_contacting_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """parse() names a misspelt backend key and accepts a good table, loading no PKCS#11 library and opening no connection."""
    import pkcs11

    def refuse(*args: object, **kwargs: object) -> Any:
        raise AssertionError("parse contacted the store")

    monkeypatch.setattr(pkcs11, "lib", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    token = tmp_path / "token"
    token.write_text("s.not-a-real-token\n")
    vault = {"type": "vault", "addr": "http://127.0.0.1:8200", "token_file": str(token)}
    tables = {"pkcs11": pkcs11_backend_config(), "vault": vault}
    for kind, table in tables.items():
        entry = backend_type(kind)
        assert entry.parse(table) is not None
        misspelt = {**table, "tokn_file": str(token)}
        with pytest.raises(ValueError, match=r"^tokn_file: unknown key \(known: "):
            entry.parse(misspelt)
    with pytest.raises(NotSupported, match="unknown backend type 'hsm'"):
        backend_type("hsm")
