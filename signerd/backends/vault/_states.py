"""What Vault's answers about a key say, and how its versions map to states (pure; no calls).

Each signerd key is one transit key of type ``ed25519`` named
``<key_prefix><tenant>.<name>`` (``.`` cannot occur in a tenant or a name, so
the mapping is one to one), in the tenant's mount from ``tenant_mounts`` or
else in ``mount``. Keys are created with ``exportable=false`` and
``allow_plaintext_backup=false``: private material never leaves Vault.

Versions are transit versions, and their states are read from Vault alone, so
that several daemons pointed at the same Vault agree:

- ``destroyed``: below ``min_available_version`` (trimmed from transit);
- ``retired``: below ``min_decryption_version``, or listed as retired in the
  key's metadata record (see below); ``pending_deletion`` instead when the
  record holds a deletion time for it;
- ``active``: ``min_encryption_version`` when it is set, else the latest
  version (Vault itself then refuses to sign with anything older);
- ``pending``: above the active version;
- ``verify-only``: the rest.

Transit cannot hold two things, kept in a KV v2 record per key at
``<metadata_mount>/data/<mount>/<transit key name>``, written with
check-and-set: versions retired out of order (a pending version, or a version
above one still verify-only, since ``min_decryption_version`` is a floor), and
the public keys and creation times of versions below the floor, which transit
stops returning once they are archived or trimmed; and per version the time
of its last state change and a scheduled deletion's time. The record is read with
each description; a missing record means "nothing out of order".

The record also holds the lease of a state change in progress (see ``_lease``):
every create, rotate, state change and destroy of a key takes it with
check-and-set first, so changes through several daemons are serialised.

Destroy trims with ``min_available_version``, which only cuts from the oldest
version up: a version can be destroyed once every older one is destroyed.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ...errors import BackendError
from ...wire import KeyName
from .. import KeyInfo, KeyVersion, VersionState
from ._http import Json

log = logging.getLogger("signerd.vault")


@dataclass(frozen=True)
class Transit:
    """What transit says about one key."""

    latest: int
    min_available: int
    min_decryption: int
    min_encryption: int
    keys: Mapping[int, tuple[bytes, int]]  # version -> (public key, created_at)

    @property
    def active(self) -> int:
        return self.min_encryption or self.latest


_HOLDER = re.compile(r"[A-Za-z0-9._:-]{1,100}")
_NONCE = re.compile(r"[0-9a-f]{16,64}")
MAX_LEASE_MS = 3_600_000  # a record whose lease claims longer is malformed


@dataclass(frozen=True)
class Lease:
    """Who is changing the key now: a daemon's process, and a nonce per change."""

    holder: str  # host:pid of the holder (for logs)
    nonce: str  # unique to this change: the holder finds its own write by it
    op: str  # what it is doing (create, rotate, set_state, destroy)
    ttl_ms: int  # how long the holder may hold it
    expires: int  # holder's wall clock, Unix milliseconds

    def to_json(self) -> Json:
        return {
            "holder": self.holder,
            "nonce": self.nonce,
            "op": self.op,
            "ttl_ms": self.ttl_ms,
            "expires": self.expires,
        }


@dataclass(frozen=True)
class Record:
    """The key's metadata record in KV v2 (what transit cannot hold)."""

    retired: frozenset[int] = frozenset()
    archived: Mapping[int, tuple[bytes, int]] = field(default_factory=dict)
    changed: Mapping[int, int] = field(default_factory=dict)  # version -> state_changed_at
    deletion: Mapping[int, int] = field(default_factory=dict)  # version -> deletion_at
    cas: int = 0  # KV version the record was read at (0: no record)
    lease: Lease | None = None

    def to_json(self) -> Json:
        data: Json = {
            "format": 1,
            "retired": sorted(self.retired),
            "changed": {str(v): t for v, t in sorted(self.changed.items())},
            "deletion": {str(v): t for v, t in sorted(self.deletion.items())},
            "archived": {
                str(v): {"public_key": base64.b64encode(pk).decode("ascii"), "created_at": ts}
                for v, (pk, ts) in sorted(self.archived.items())
            },
        }
        if self.lease is not None:
            data["lease"] = self.lease.to_json()
        return data


def key_info(key: KeyName, transit: Transit, meta: Record) -> KeyInfo:
    active = transit.active
    versions = []
    for v in range(1, transit.latest + 1):
        if v < transit.min_available:
            state = VersionState.DESTROYED
        elif v < transit.min_decryption:
            state = VersionState.RETIRED
        elif v == active:
            state = VersionState.ACTIVE
        elif v in meta.retired:
            state = VersionState.RETIRED
        elif v > active:
            state = VersionState.PENDING
        else:
            state = VersionState.VERIFY_ONLY
        deletion_at = meta.deletion.get(v)
        if state is VersionState.RETIRED and deletion_at is not None:
            state = VersionState.PENDING_DELETION
        elif state is not VersionState.PENDING_DELETION:
            deletion_at = None
        public_key, created_at = transit.keys.get(v) or meta.archived.get(v) or (b"", 0)
        if not public_key:
            log.warning("signerd.vault.public_key_missing key=%s version=%s", key, v)
        changed_at = meta.changed.get(v)
        versions.append(
            KeyVersion(v, key.kid(v), state, public_key, created_at, changed_at, deletion_at)
        )
    return KeyInfo(key, tuple(versions))


def raw_public_key(text: Any) -> bytes:
    raw = base64.b64decode(str(text), validate=True)
    if len(raw) != 32:
        raise ValueError(f"public key of {len(raw)} bytes")
    return raw


def unix_time(text: Any) -> int:
    """Unix seconds from transit's RFC 3339 creation time (nanosecond fraction)."""
    stamp = str(text)
    head, dot, rest = stamp.partition(".")
    if dot:  # drop the fraction, keep the zone
        zone = rest.lstrip("0123456789")
        stamp = head + zone
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())


class ForeignKey(BackendError):
    """A transit key under signerd's name that is not an Ed25519 key."""


def malformed(what: str, exc: BaseException) -> BackendError:
    """The error for an answer signerd cannot read (the cause is logged, not returned)."""
    log.error(
        "signerd.vault.malformed_answer what=%s cause=%s detail=%s", what, type(exc).__name__, exc
    )
    return BackendError("Vault answered something signerd does not understand")


def transit_of(key: KeyName, answer: Json) -> Transit:
    """What transit's key read says; ForeignKey unless the key is an Ed25519 key."""
    try:
        data = answer["data"]
        if data["type"] != "ed25519":
            log.error("signerd.vault.foreign_key key=%s type=%s", key, data["type"])
            raise ForeignKey("the Vault key is not an Ed25519 key")
        keys = {
            int(v): (raw_public_key(k["public_key"]), unix_time(k["creation_time"]))
            for v, k in data["keys"].items()
        }
        return Transit(
            latest=int(data["latest_version"]),
            min_available=int(data["min_available_version"]),
            min_decryption=int(data["min_decryption_version"]),
            min_encryption=int(data["min_encryption_version"]),
            keys=keys,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise malformed("transit key", exc) from exc


def record_of(answer: Json) -> Record:
    """The metadata record from its KV v2 read."""
    try:
        data = answer["data"]["data"] or {}
        return Record(
            retired=frozenset(int(v) for v in data.get("retired", ())),
            archived={
                int(v): (raw_public_key(a["public_key"]), int(a["created_at"]))
                for v, a in data.get("archived", {}).items()
            },
            changed={int(v): int(t) for v, t in data.get("changed", {}).items()},
            deletion={int(v): int(t) for v, t in data.get("deletion", {}).items()},
            cas=int(answer["data"]["metadata"]["version"]),
            lease=lease_of(data.get("lease")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise malformed("metadata record", exc) from exc


def lease_of(data: Any) -> Lease | None:
    """The lease a record holds (None: no change in progress); ValueError if malformed."""
    if data is None:
        return None
    holder, nonce, op = (str(data[f]) for f in ("holder", "nonce", "op"))
    ttl_ms, expires = int(data["ttl_ms"]), int(data["expires"])
    if not (_HOLDER.fullmatch(holder) and _NONCE.fullmatch(nonce) and _HOLDER.fullmatch(op)):
        raise ValueError("lease holder, nonce or operation")
    if not 0 < ttl_ms <= MAX_LEASE_MS or not 0 <= expires < 2**53:
        raise ValueError("lease times")
    return Lease(holder, nonce, op, ttl_ms, expires)
