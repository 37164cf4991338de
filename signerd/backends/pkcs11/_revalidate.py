"""Whether the keys on the token are as the last listing found them, without a search.

A search on SoftHSM opens every object file of the token (about 2 s with
10,000 key versions) and holds the module lock meanwhile, so signatures wait
behind it and the other workers lose a CPU to it. A key's metadata object is
never modified: each change writes a new one and destroys the old
(``_write_meta``). Reading one attribute of each metadata object the last
listing found therefore tells whether any listed key changed: a destroyed
object answers ``ObjectHandleInvalid``, also when another process destroyed
it, and a token whose files cannot be opened fails the read. Keys that another
process created are not seen this way; the key service lists in full every
few periods for them (``signerd.keys._periodic``).
"""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11e
from pkcs11 import Attribute

from ...errors import SignerdError
from ._session import TokenSession

__all__ = ["unchanged"]


def unchanged(token: TokenSession) -> bool:
    """True when every metadata object of the last listing reads back (a logged-in
    session needed: they are private objects); False on any doubt, to list in full."""

    def run(session: Any) -> bool:
        handles = list(token.meta_handles.values())
        if not handles:
            return False
        try:
            for obj in handles:
                _ = obj[Attribute.VALUE]
        except p11e.PKCS11Error:
            return False
        return True

    try:
        return token.call(run)
    except SignerdError:
        return False
