"""What signerd keeps on a PKCS#11 token, and how it reads it back.

* per version, a key pair generated on the token (``CKK_EC_EDWARDS``), both
  halves labelled with the kid (``CKA_LABEL`` = ``CKA_ID`` = kid); the private
  half is ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``, not
  ``CKA_EXTRACTABLE``;
* per key, a private ``CKO_DATA`` object (application ``signerd``, label
  ``signerd/TENANT/NAME``) whose value is the key's state as JSON with a
  sequence number (``KeyMeta``). Data values are read-only once created, so a
  state change writes a new object with the next sequence and then removes the
  old ones; a reader takes the highest sequence, so each change is one atomic
  step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ...errors import BackendError, BackendUnavailable
from ...wire import KeyName, valid_part
from .. import VersionState

log = logging.getLogger("signerd.pkcs11")

APPLICATION = "signerd"
ED25519_OID = "1.3.101.112"
_META_FORMAT = 1

#: file descriptors that must be free for the token to be trusted (SoftHSM opens
#: an object file and its lock file per object it reads)
_FD_HEADROOM = 8


def raw_public_key(ec_point: bytes) -> bytes:
    """The raw 32-byte Ed25519 key from CKA_EC_POINT, DER-wrapped (SoftHSM) or raw."""
    if len(ec_point) == 32:
        return ec_point
    if len(ec_point) == 34 and ec_point[0] == 0x04 and ec_point[1] == 0x20:
        return ec_point[2:]
    raise BackendError("token returned an Ed25519 public key of unexpected form")


def _public_key(text: object) -> bytes:
    """A public key kept in metadata: canonical base64 of 32 bytes, else ValueError."""
    if not isinstance(text, str):
        raise ValueError("public_key is not a string")
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32 or base64.b64encode(raw).decode() != text:
        raise ValueError("public_key is not 32 bytes in canonical base64")
    return raw


def meta_label(key: KeyName) -> str:
    """The label of a key's metadata objects."""
    return f"signerd/{key.tenant}/{key.name}"


def key_of_label(label: str) -> KeyName | None:
    """The key a metadata label names; None unless the name is valid in full."""
    parts = label.split("/")
    if len(parts) != 3 or parts[0] != "signerd":
        return None
    if not all(valid_part(p) and p.isprintable() for p in parts[1:]):
        return None
    return KeyName(parts[1], parts[2])


def label_digest(label: object) -> str:
    """A short, log-safe fingerprint of a token object's label (never the label itself)."""
    raw = (
        label.encode("utf-8", "surrogateescape") if isinstance(label, str) else repr(label).encode()
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def resources_available() -> None:
    """Raise BackendUnavailable unless this process can open files now.

    SoftHSM answers a search with no objects, and no error, when it cannot open
    its object files; an empty listing then says nothing about the keyring.
    """
    fds: list[int] = []
    try:
        for _ in range(_FD_HEADROOM):
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        log.error("signerd.pkcs11.no_file_descriptors errno=%s", exc.errno)
        raise BackendUnavailable("the daemon cannot open files (resource limit)") from exc
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class KeyMeta:
    """The value of a key's metadata object: its versions' states, with a sequence number.

    Per version, optionally (absent in metadata written before they were kept):
    ``changed_at``, when its state last changed, and for ``pending_deletion``
    ``deletion_at``, when the daemon destroys it; ``public_key``, the version's
    public key (base64), so that reading the keyring reads one object per key,
    not one per version. The public-key objects stay on the token as before.
    """

    seq: int
    versions: dict[int, tuple[VersionState, int]]  # version -> (state, created_at)
    changed: Mapping[int, int] = field(default_factory=dict)  # version -> changed_at
    deletion: Mapping[int, int] = field(default_factory=dict)  # version -> deletion_at
    public: Mapping[int, bytes] = field(default_factory=dict)  # version -> raw public key

    def encode(self) -> bytes:
        versions: dict[str, dict[str, object]] = {}
        for v, (s, c) in self.versions.items():
            entry: dict[str, object] = {"state": s.value, "created_at": c}
            if v in self.changed:
                entry["changed_at"] = self.changed[v]
            if v in self.deletion:
                entry["deletion_at"] = self.deletion[v]
            if v in self.public:
                entry["public_key"] = base64.b64encode(self.public[v]).decode()
            versions[str(v)] = entry
        body = {"format": _META_FORMAT, "seq": self.seq, "versions": versions}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> KeyMeta:
        body = json.loads(raw)
        if body.get("format") != _META_FORMAT:
            raise ValueError("unknown metadata format")
        items = {int(v): d for v, d in body["versions"].items()}
        versions = {v: (VersionState(d["state"]), int(d["created_at"])) for v, d in items.items()}
        changed = {v: int(d["changed_at"]) for v, d in items.items() if "changed_at" in d}
        deletion = {v: int(d["deletion_at"]) for v, d in items.items() if "deletion_at" in d}
        public = {v: _public_key(d["public_key"]) for v, d in items.items() if "public_key" in d}
        return cls(int(body["seq"]), versions, changed, deletion, public)

    def public_keys(self, key: KeyName) -> dict[str, bytes]:
        """The public keys kept in this metadata, by kid."""
        return {key.kid(v): raw for v, raw in self.public.items()}

    def with_public(self, key: KeyName, known: Mapping[str, bytes]) -> KeyMeta:
        """This metadata with each version's public key that ``known`` (by kid) holds."""
        public = dict(self.public)
        for v in self.versions:
            if (raw := known.get(key.kid(v))) is not None:
                public[v] = raw
        return KeyMeta(self.seq, self.versions, self.changed, self.deletion, public)

    def with_states(
        self,
        changes: Mapping[int, VersionState],
        created_at: int | None = None,
        deletion_at: int | None = None,
    ) -> KeyMeta:
        """The next metadata: ``changes`` applied, each version whose state changes stamped
        with the time now; ``deletion_at`` is kept for the versions changed to
        pending_deletion (a version leaving that state loses its time)."""
        now = int(time.time())
        versions = dict(self.versions)
        changed = dict(self.changed)
        deletion = dict(self.deletion)
        for version, state in changes.items():
            created = versions[version][1] if version in versions else (created_at or now)
            if version not in versions or versions[version][0] is not state:
                changed[version] = now
            versions[version] = (state, created)
            if state is VersionState.PENDING_DELETION and deletion_at is not None:
                deletion[version] = deletion_at
            else:
                deletion.pop(version, None)
        return KeyMeta(self.seq + 1, versions, changed, deletion, self.public)

    def promotion(self, version: int) -> dict[int, VersionState]:
        """Make version active and the current active verify-only, as one change."""
        changes = {
            v: VersionState.VERIFY_ONLY
            for v, (s, _) in self.versions.items()
            if s is VersionState.ACTIVE
        }
        changes[version] = VersionState.ACTIVE
        return changes
