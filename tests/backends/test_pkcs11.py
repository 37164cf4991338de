"""The PKCS#11 backend on a real SoftHSM token: what the token itself says about the keys."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pkcs11 import Attribute, KeyType, ObjectClass

from signerd.backends import CredentialsRefused, VersionState
from signerd.backends.pkcs11 import Pkcs11Backend, _backend, from_config
from signerd.backends.pkcs11._objects import KeyMeta, raw_public_key
from signerd.backends.pkcs11._session import TokenSession
from signerd.errors import BackendUnavailable
from signerd.wire import KeyName

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


def test_refused_pin_is_credentials_refused_on_the_wire_as_backend_unavailable(
    tmp_path: Path,
) -> None:
    """A PIN the token refuses raises CredentialsRefused naming PinIncorrect, whose wire code is backend_unavailable."""
    pin = tmp_path / "wrong.pin"
    pin.write_text("Wr0ng-pin-zq\n")
    backend = from_config({**pkcs11_backend_config(), "pin_file": str(pin)})
    try:
        with pytest.raises(CredentialsRefused) as refused:
            backend.list_keys()
    finally:
        backend.close()
    assert refused.value.reason == "PinIncorrect"
    assert isinstance(refused.value, BackendUnavailable)
    assert refused.value.code == "backend_unavailable" and refused.value.status == 503
    assert "Wr0ng" not in refused.value.message


def test_a_bug_while_connecting_is_not_reported_as_a_token_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A programming error (TypeError) while opening the session propagates as itself, never as backend_unavailable."""

    def broken(self: TokenSession, lib: object) -> object:
        raise TypeError("a bug")

    monkeypatch.setattr(TokenSession, "_find_token", broken)
    backend = from_config(pkcs11_backend_config())
    try:
        with pytest.raises(TypeError, match="a bug"):
            backend.list_keys()
    finally:
        backend.close()


def test_object_uri_is_rfc7512_with_escaped_attributes() -> None:
    """A version's URI names the token by label and serial (percent-encoded where RFC 7512
    requires it), the object's label, its CKA_ID byte by byte, and type=private."""
    from signerd.backends.pkcs11._settings import TokenConfig, object_uri

    config = TokenConfig("/lib/x.so", "/pin", token_label="My Token;1/ü", token_serial="a1b2")
    uri = object_uri(config, "acme.feedback.v2")
    assert uri == (
        "pkcs11:token=My%20Token%3B1%2F%C3%BC;serial=a1b2;"
        "id=%61%63%6d%65%2e%66%65%65%64%62%61%63%6b%2e%76%32;object=acme.feedback.v2;type=private"
    )
    assert object_uri(TokenConfig("/lib/x.so", "/pin", token_serial="s"), "a.b.v1").startswith(
        "pkcs11:serial=s;id=%61%2e%62%2e%76%31;"
    )


def _private_keys(backend: Pkcs11Backend, kid: str) -> list[object]:
    template = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: kid}
    return backend.on_token(lambda s: list(s.get_objects(template)))


class _Killed(BaseException):
    """Stands for the process dying at this point."""


def test_a_destroy_cut_short_after_its_state_leaves_no_private_key_behind(
    backend: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destroy killed between its state and the key's removal: the state says destroyed,
    and the next process to list the token removes the leftover private key."""
    key = KeyName(unique("p11"), "cut")
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, VersionState.RETIRED)

    def killed(session: object, kid: str) -> int:
        raise _Killed()

    monkeypatch.setattr(_backend, "remove_private", killed)
    with pytest.raises(_Killed):
        backend.destroy(key, 1)
    monkeypatch.undo()
    assert backend.describe(key).versions[0].state is VersionState.DESTROYED
    assert backend.private_key_attributes(key.kid(1))  # still there: the kill came first
    after = from_config(pkcs11_backend_config())  # the next process
    try:
        assert key in {i.key for i in after.list_keys()}
        assert not _private_keys(after, key.kid(1))
        assert len(_private_keys(after, key.kid(2))) == 1  # only the destroyed one went
    finally:
        after.close()


def _meta_values(backend: Pkcs11Backend, key: KeyName) -> list[dict[str, Any]]:
    """The key's metadata objects' values, as JSON, straight from the token."""
    template = {
        Attribute.CLASS: ObjectClass.DATA,
        Attribute.LABEL: f"signerd/{key.tenant}/{key.name}",
    }
    return backend.on_token(
        lambda s: [json.loads(o[Attribute.VALUE]) for o in s.get_objects(template)]
    )


def _public_objects(backend: Pkcs11Backend, kid: str) -> list[bytes]:
    template = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: kid}
    return backend.on_token(lambda s: [o[Attribute.EC_POINT] for o in s.get_objects(template)])


def test_the_keyring_is_read_from_metadata_that_keeps_each_versions_public_key(
    backend: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every metadata write keeps each version's public key, equal to its public-key object
    on the token; a new process lists the keyring without a search for public-key objects,
    and its keys are those objects' keys."""
    key = KeyName(unique("p11"), "meta")
    backend.create(key)
    backend.rotate(key, pending=False)
    info = backend.rotate(key, pending=True)
    (value,) = _meta_values(backend, key)
    versions = value["versions"]
    assert isinstance(versions, dict) and sorted(versions) == ["1", "2", "3"]
    for v in info.versions:
        kept = base64.b64decode(versions[str(v.version)]["public_key"])
        (point,) = _public_objects(backend, v.kid)
        assert kept == v.public_key == raw_public_key(point), v.kid
    searched: set[str] = set()
    monkeypatch.setattr(
        _backend.Pkcs11Backend, "_prefetch_public", lambda self, s, kids: searched.update(kids)
    )
    after = from_config(pkcs11_backend_config())  # the next process
    try:
        listed = {i.key: i for i in after.list_keys()}
        assert [v.public_key for v in listed[key].versions] == [v.public_key for v in info.versions]
        assert not searched & {v.kid for v in info.versions}, searched  # none of its versions
    finally:
        after.close()


def test_a_version_made_by_another_process_is_described_from_its_metadata(
    backend: Pkcs11Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that re-reads a key another process rotated takes the new version's public
    key from the metadata it has just read: no search of the token for it."""
    key = KeyName(unique("p11"), "other")
    backend.create(key)
    after = from_config(pkcs11_backend_config())  # the other process
    try:
        after.list_keys()
        made = backend.rotate(key, pending=False).versions[-1]
        asked: list[str] = []
        look_up = _backend.Pkcs11Backend._public_key

        def counted(self: Pkcs11Backend, session: Any, kid: str) -> bytes:
            if kid not in self._public:
                asked.append(kid)
            return look_up(self, session, kid)

        monkeypatch.setattr(_backend.Pkcs11Backend, "_public_key", counted)
        info = after.describe(key)
        assert [v.kid for v in info.versions] == [key.kid(1), made.kid]
        assert info.versions[-1].public_key == made.public_key
        assert asked == []
    finally:
        after.close()


def test_metadata_written_before_public_keys_were_kept_still_lists_and_gains_them(
    backend: Pkcs11Backend,
) -> None:
    """A key whose metadata has no public keys (written by an older signerd) lists with its
    public keys read from the token's objects, and its next change writes them in."""
    key = KeyName(unique("p11"), "old")
    made = backend.create(key)
    label = f"signerd/{key.tenant}/{key.name}"
    (value,) = _meta_values(backend, key)
    for entry in value["versions"].values():
        del entry["public_key"]
    old = json.dumps({**value, "seq": int(value["seq"]) + 1}).encode()

    def rewrite(s: Any) -> None:
        s.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.APPLICATION: "signerd",
                Attribute.LABEL: label,
                Attribute.VALUE: old,
            }
        )

    backend.on_token(rewrite)
    after = from_config(pkcs11_backend_config())
    try:
        listed = {i.key: i for i in after.list_keys()}
        assert [v.public_key for v in listed[key].versions] == [made.versions[0].public_key]
        after.rotate(key, pending=True)
        newest = max(_meta_values(after, key), key=lambda v: int(v["seq"]))
        assert all("public_key" in e for e in newest["versions"].values())
    finally:
        after.close()


def test_a_malformed_kept_public_key_makes_the_metadata_unreadable() -> None:
    """A kept public key must be canonical base64 of 32 bytes; anything else is refused as
    malformed metadata (the key is skipped and logged, never signed with a wrong key)."""
    good = base64.b64encode(bytes(range(32))).decode()
    entry: dict[str, Any] = {"state": "active", "created_at": 1, "public_key": good}
    body = {"format": 1, "seq": 1, "versions": {"1": entry}}
    assert KeyMeta.decode(json.dumps(body).encode()).public == {1: bytes(range(32))}
    for bad in (
        good[:-4],
        good.rstrip("="),
        good + "AAAA",
        32,
        "not base64 at all!!",
        good[:-2] + "x=",
    ):
        entry["public_key"] = bad
        with pytest.raises(ValueError):
            KeyMeta.decode(json.dumps(body).encode())
