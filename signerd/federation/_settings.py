"""The ``[federation]`` table of the configuration (explained in config/signerd.example.toml)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SignerdError
from ..wire import DEFAULT_MAX_BYTES, DEFAULT_MAX_DEPTH, valid_part
from ._trust import PeerKey, jwk_public, pem_public, valid_peer_kid

__all__ = ["FederationSettings", "check_reload", "parse_federation", "trusted_key_errors"]

_TOP = {
    "state_dir",
    "skew",
    "nonce_ttl",
    "max_json_bytes",
    "max_depth",
    "nonces",
    "trusted_keys",
    "allow_shared_keys",
}
_NONCES = {
    "store",
    "path",
    "max_entries",
    "max_entries_per_tenant",
    "timeout",
    "url",
    "prefix",
    "pool",
}
_PEER = {"tenant", "kid", "jwk_file", "pem_file"}


@dataclass(frozen=True)
class FederationSettings:
    state_dir: str = "state"
    skew: int = 300  # seconds a timestamp may be off, both directions
    nonce_ttl: int = 600  # seconds a nonce is remembered; at least 2 * skew
    max_json_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = DEFAULT_MAX_DEPTH
    store: str = "sqlite"  # or "redis"
    sqlite_path: str = "state/nonces.sqlite3"
    max_entries: int = 1_000_000  # live nonces, the daemon as a whole
    max_entries_per_tenant: int = 250_000  # live nonces one tenant may hold (max_entries // 4)
    timeout: float = 2.0  # seconds a nonce store may take before 503
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "signerd:nonce:"
    redis_pool: int = 64
    trusted: tuple[PeerKey, ...] = ()
    allow_shared_keys: bool = False  # one public key trusted for several tenants


#: the nonce store's settings: a reload that changes one is refused (restart signerd)
_RESTART_ONLY = {
    "state_dir": "federation.state_dir",
    "store": "federation.nonces.store",
    "sqlite_path": "federation.nonces.path",
    "max_entries": "federation.nonces.max_entries",
    "max_entries_per_tenant": "federation.nonces.max_entries_per_tenant",
    "timeout": "federation.nonces.timeout",
    "redis_url": "federation.nonces.url",
    "redis_prefix": "federation.nonces.prefix",
    "redis_pool": "federation.nonces.pool",
}


def check_reload(old: FederationSettings, new: FederationSettings) -> None:
    """ValueError naming the keys when ``new`` changes what only a restart may change."""
    changed = [
        key for field, key in _RESTART_ONLY.items() if getattr(old, field) != getattr(new, field)
    ]
    if changed:
        raise ValueError(f"{', '.join(changed)}: cannot change on reload (restart signerd)")


def _number(table: Mapping[str, Any], path: str, key: str, kind: type, default: Any) -> Any:
    value: Any = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or type(value) is not kind
        or value <= 0
    ):
        raise ValueError(f"{path}.{key}: must be a positive {kind.__name__}, got {value!r}")
    return value


def _path(base: str, value: str) -> str:
    return value if os.path.isabs(value) else os.path.normpath(os.path.join(base, value))


def parse_federation(table: Mapping[str, Any], base: str) -> FederationSettings:
    """Validate the table; ValueError names the key. ``base``: the config file's directory."""
    for key in table:
        if key not in _TOP:
            raise ValueError(f"federation.{key}: unknown key")
    state_dir = table.get("state_dir", "state")
    if not isinstance(state_dir, str) or not state_dir:
        raise ValueError("federation.state_dir: must be a directory path")
    state_dir = _path(base, state_dir)
    skew = _number(table, "federation", "skew", int, 300)
    ttl = _number(table, "federation", "nonce_ttl", int, 2 * skew)
    if ttl < 2 * skew:
        raise ValueError(f"federation.nonce_ttl: must be at least 2 * skew ({2 * skew}), got {ttl}")
    nonces = table.get("nonces", {})
    if not isinstance(nonces, dict):
        raise ValueError("federation.nonces: must be a table")
    for key in nonces:
        if key not in _NONCES:
            raise ValueError(f"federation.nonces.{key}: unknown key")
    store = nonces.get("store", "sqlite")
    if store not in ("sqlite", "redis"):
        raise ValueError(f"federation.nonces.store: 'sqlite' or 'redis', got {store!r}")
    sqlite_path = nonces.get("path", "nonces.sqlite3")
    if not isinstance(sqlite_path, str) or not sqlite_path:
        raise ValueError("federation.nonces.path: must be a file path")
    url = nonces.get("url", FederationSettings.redis_url)
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("federation.nonces.url: must be a redis://, rediss:// or unix:// URL")
    prefix = nonces.get("prefix", FederationSettings.redis_prefix)
    if not isinstance(prefix, str):
        raise ValueError("federation.nonces.prefix: must be a string")
    shared = table.get("allow_shared_keys", False)
    if not isinstance(shared, bool):
        raise ValueError("federation.allow_shared_keys: must be true or false")
    max_entries = _number(nonces, "federation.nonces", "max_entries", int, 1_000_000)
    per_tenant = _number(
        nonces, "federation.nonces", "max_entries_per_tenant", int, max(1, max_entries // 4)
    )
    if per_tenant > max_entries:
        raise ValueError(
            f"federation.nonces.max_entries_per_tenant: at most max_entries ({max_entries})"
        )
    return FederationSettings(
        state_dir=state_dir,
        skew=skew,
        nonce_ttl=ttl,
        max_json_bytes=_number(table, "federation", "max_json_bytes", int, DEFAULT_MAX_BYTES),
        max_depth=_number(table, "federation", "max_depth", int, DEFAULT_MAX_DEPTH),
        store=store,
        sqlite_path=_path(state_dir, sqlite_path),
        max_entries=max_entries,
        max_entries_per_tenant=per_tenant,
        timeout=_number(
            nonces, "federation.nonces", "timeout", float, 2.0 if store == "sqlite" else 0.5
        ),
        redis_url=url,
        redis_prefix=prefix,
        redis_pool=_number(nonces, "federation.nonces", "pool", int, 64),
        trusted=_peers(table.get("trusted_keys", []), base, shared),
        allow_shared_keys=shared,
    )


def trusted_key_errors(table: Mapping[str, Any], base: str) -> list[str]:
    """Every ``federation.trusted_keys`` entry that cannot be read, one message each."""
    items = table.get("trusted_keys", [])
    if not isinstance(items, list):
        return ["federation.trusted_keys: must be an array of tables"]
    errors = []
    for i, item in enumerate(items):
        try:
            _peer(f"federation.trusted_keys[{i}]", item, base)
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def _peer(where: str, item: Any, base: str) -> PeerKey:
    """One trusted key entry, its file read and checked; ValueError names the entry."""
    if not isinstance(item, dict) or set(item) - _PEER:
        raise ValueError(f"{where}: only tenant, kid and jwk_file or pem_file may be set")
    tenant, kid = item.get("tenant"), item.get("kid")
    if not isinstance(tenant, str) or not valid_part(tenant):
        raise ValueError(f"{where}.tenant: not a valid tenant name: {tenant!r}")
    if not valid_peer_kid(kid):
        raise ValueError(f"{where}.kid: must match [A-Za-z0-9._:-]{{1,128}}, got {kid!r}")
    assert isinstance(kid, str)
    files = [k for k in ("jwk_file", "pem_file") if k in item]
    if len(files) != 1 or not isinstance(item[files[0]], str):
        raise ValueError(f"{where}: exactly one of jwk_file, pem_file")
    path = _path(base, item[files[0]])
    try:
        with open(path, "rb") as fh:
            data = fh.read(65536)
        public = jwk_public(json.loads(data), kid) if files[0] == "jwk_file" else pem_public(data)
    except OSError as exc:
        raise ValueError(f"{where}.{files[0]}: cannot read {path}: {exc.strerror}") from exc
    except (ValueError, SignerdError) as exc:
        raise ValueError(f"{where}.{files[0]}: not an Ed25519 public key: {exc}") from exc
    return PeerKey(tenant, kid, public, source="config")


def _peers(items: Any, base: str, allow_shared: bool) -> tuple[PeerKey, ...]:
    if not isinstance(items, list):
        raise ValueError("federation.trusted_keys: must be an array of tables")
    peers: dict[tuple[str, str], PeerKey] = {}
    for i, item in enumerate(items):
        where = f"federation.trusted_keys[{i}]"
        peer = _peer(where, item, base)
        tenant, kid, public = peer.tenant, peer.kid, peer.public
        if (tenant, kid) in peers:
            raise ValueError(f"{where}: tenant {tenant!r} already trusts kid {kid!r}")
        others = sorted({p.tenant for p in peers.values() if p.public == public} - {tenant})
        if others and not allow_shared:
            raise ValueError(
                f"{where}: this public key is already trusted for tenant {others[0]!r};"
                " one key for several tenants needs federation.allow_shared_keys = true"
            )
        peers[(tenant, kid)] = peer
    return tuple(peers.values())
