"""Private keys of destroyed versions: removed after the state says destroyed.

A destroy writes the version's ``destroyed`` state first (the change is made
there, after its intent record) and removes the private key next. A process
killed between the two leaves a private key behind a state that says it is
gone; the next process to list the token removes it (``sweep``), once, before
it serves. The other order would leave a ``retired`` version whose key is
gone, a state that no later call corrects.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pkcs11 import Attribute, ObjectClass
from pkcs11 import exceptions as p11e

from ...wire import KeyName
from .. import VersionState
from ._objects import KeyMeta

__all__ = ["remove_private", "sweep"]

log = logging.getLogger("signerd.pkcs11")


def remove_private(session: Any, kid: str) -> int:
    """Remove the private key(s) labelled ``kid``; how many were removed."""
    found = list(
        session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: kid})
    )
    for obj in found:
        obj.destroy()
    return len(found)


def sweep(session: Any, latest: Mapping[KeyName, KeyMeta]) -> list[str]:
    """Remove the private keys left of the destroyed versions in ``latest`` (one search over
    the token's private keys); the kids whose key was removed, each logged. A removal another
    process made first is not an error."""
    wanted = {
        key.kid(v)
        for key, meta in latest.items()
        for v, (state, _) in meta.versions.items()
        if state is VersionState.DESTROYED
    }
    if not wanted:
        return []
    removed = []
    for obj in list(session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
        label = obj[Attribute.LABEL]
        if label not in wanted:
            continue
        try:
            obj.destroy()
        except (p11e.ObjectHandleInvalid, p11e.NoSuchKey):
            continue
        log.warning("signerd.pkcs11.destroyed_leftover kid=%s", label)
        removed.append(str(label))
    return removed
