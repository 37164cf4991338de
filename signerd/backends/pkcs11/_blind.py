"""Telling a key that is gone from a token that cannot see it.

SoftHSM answers a search with nothing, and no error, when it cannot open its
object files (a token directory moved away, files made unreadable, no file
descriptors). A search that finds nothing is therefore proof of absence only
when the token shows what it should: these checks raise ``TokenVanished``
(which the session climbs its recovery ladder for, and answers 503 when that
fails) instead of letting an empty answer become ``unknown_key`` or
``unknown_version``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pkcs11 import Attribute, ObjectClass

from ...errors import BackendUnavailable, UnknownVersion
from ...wire import KeyName
from .. import KeyInfo, VersionState
from ._ladder import TokenVanished
from ._objects import APPLICATION, KeyMeta, meta_label


def _shows(session: Any, template: dict[Attribute, Any]) -> bool:
    return any(True for _ in session.get_objects(template))


def blind_check(session: Any, key: KeyName, *, listed: int) -> None:
    """Raise TokenVanished if a search that found no metadata for ``key`` may be a token
    that cannot read its files: the key's first public key shows (its metadata cannot be
    read), or keys were listed before (``listed``) and none shows now."""
    if _shows(session, {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: key.kid(1)}):
        raise TokenVanished("a key's public key shows without its metadata")
    if listed and not _shows(
        session, {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: APPLICATION}
    ):
        raise TokenVanished("the token shows none of its keys")


def version_gone(meta: KeyMeta, version: int) -> None:
    """A version's private key was not found: UnknownVersion if the key's metadata says the
    version never was or was destroyed; otherwise it returns (the token cannot see it)."""
    state = meta.versions.get(version)
    if state is None or state[0] is VersionState.DESTROYED:
        raise UnknownVersion("version has no private key on the token")


def absent_keys(
    session: Any, meta: KeyMeta, control: KeyName, missing: Sequence[KeyInfo]
) -> frozenset[KeyName]:
    """Of ``missing``, the keys nothing on the token is labelled for (their metadata or
    any of their kids), once ``control`` (a listed key, whose metadata is ``meta``) shows
    every one of its objects; BackendUnavailable when it does not."""
    for version in meta.versions:
        if not _shows(session, {Attribute.LABEL: control.kid(version)}):
            raise BackendUnavailable("a listed key's objects cannot be read")
    gone = set()
    for info in missing:
        labels = [meta_label(info.key)] + [v.kid for v in info.versions]
        if not any(_shows(session, {Attribute.LABEL: label}) for label in labels):
            gone.add(info.key)
    return frozenset(gone)
