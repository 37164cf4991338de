"""Offline repair of a token (``signerctl keys purge-invalid``).

Removes keys whose names are invalid (written before names were matched in
full), which no API can address. It removes only objects signerd wrote whose
key name is invalid (the metadata object and the key pairs labelled with that
key's kids), never an object whose name is valid: metadata that does not
decode may be a newer signerd's format, so it is reported by the daemon, never
removed. Each removal is logged (``signerd.maint.purged``, with a digest of the
label) and returned for printing.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pkcs11 import Attribute, ObjectClass

from ._backend import from_config
from ._objects import APPLICATION, key_of_label, label_digest

log = logging.getLogger("signerd.pkcs11")

_KID_VERSION = r"[1-9][0-9]{0,8}"


@dataclass(frozen=True)
class Removed:
    """One token object removed (or, in a dry run, to be removed)."""

    backend: str
    object_class: str  # "data" (key metadata), "public_key", "private_key"
    label: str  # escaped (ascii()) and bounded, safe to print
    label_sha256: str


def _shown(label: str) -> str:
    text = ascii(label)
    return text if len(text) <= 120 else text[:117] + "..."


def _invalid_keys(session: Any) -> tuple[list[Any], set[str]]:
    """signerd's metadata objects whose key name is invalid, and their kid prefixes."""
    objects, prefixes = [], set()
    for obj in session.get_objects(
        {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: APPLICATION}
    ):
        label = obj[Attribute.LABEL]
        if not isinstance(label, str) or not label.startswith("signerd/"):
            continue
        if key_of_label(label) is not None:
            continue
        objects.append(obj)
        parts = label.split("/")
        if len(parts) == 3:
            prefixes.add(f"{parts[1]}.{parts[2]}.v")
    return objects, prefixes


def _purge_token(backend: str, session: Any, dry_run: bool) -> list[Removed]:
    metadata, prefixes = _invalid_keys(session)
    doomed: list[tuple[str, Any]] = [("data", obj) for obj in metadata]
    for cls, name in (
        (ObjectClass.PUBLIC_KEY, "public_key"),
        (ObjectClass.PRIVATE_KEY, "private_key"),
    ):
        for obj in session.get_objects({Attribute.CLASS: cls}):
            label = obj[Attribute.LABEL]
            if isinstance(label, str) and any(
                label.startswith(p) and re.fullmatch(_KID_VERSION, label[len(p) :])
                for p in prefixes
            ):
                doomed.append((name, obj))
    removed = []
    for name, obj in doomed:
        label = obj[Attribute.LABEL]
        item = Removed(backend, name, _shown(label), label_digest(label))
        if not dry_run:
            obj.destroy()
            log.warning(
                "signerd.maint.purged backend=%s class=%s label_sha256=%s",
                backend,
                name,
                item.label_sha256,
            )
        removed.append(item)
    return removed


def purge_invalid(
    backends: Mapping[str, Mapping[str, Any]], *, dry_run: bool = False
) -> list[Removed]:
    """Remove (or list, in a dry run) every object of an invalidly named key on each token.

    ``backends`` are a configuration's backend tables by name; tables of other
    types are skipped (transit key names are checked by the Vault backend).
    """
    removed: list[Removed] = []
    for name, table in sorted(backends.items()):
        if table.get("type") != "pkcs11":
            continue
        backend = from_config(table)

        def run(session: Any, backend_name: str = name) -> list[Removed]:
            return _purge_token(backend_name, session, dry_run)

        try:
            removed.extend(backend.on_token(run))
        finally:
            backend.close()
    return removed
