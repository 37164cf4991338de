"""The ``[backends.NAME]`` table of type ``vault``: where Vault is and how to log in.

Parsing contacts nothing (files are checked to be readable, never read), so
``signerd --check`` can validate a configuration offline.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ...wire import valid_part
from ._auth import AppRole, TokenFile

log = logging.getLogger("signerd.vault")

_MOUNT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")
# fmt: off
_KNOWN = frozenset({
    "type", "addr", "namespace", "ca_file", "token_file", "approle_role_id_file",
    "approle_secret_id_file", "approle_mount", "mount", "tenant_mounts", "key_prefix",
    "metadata_mount", "timeout", "max_concurrency", "health_interval",
})
_MAX_ADDRS = 16
# fmt: on


@dataclass(frozen=True)
class VaultSettings:
    addr: str
    source: TokenFile | AppRole
    namespace: str | None = None
    ca_file: str | None = None
    mount: str = "transit"
    tenant_mounts: Mapping[str, str] = field(default_factory=dict)
    key_prefix: str = "signerd-"
    metadata_mount: str = "secret"
    timeout: float = 5.0
    max_concurrency: int = 8
    #: every node of a cluster, in failover order (``addr`` is the first)
    addrs: tuple[str, ...] = ()
    health_interval: float = 1.0

    @property
    def nodes(self) -> tuple[str, ...]:
        return self.addrs or (self.addr,)


def parse_settings(cfg: Mapping[str, Any]) -> VaultSettings:
    """Validate the backend's configuration table; ValueError names the bad key."""
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_KNOWN))})")
    addrs = _addrs(cfg)
    addr = addrs[0]
    schemes = {urlsplit(a).scheme for a in addrs}
    if len(schemes) > 1:
        raise ValueError("addr: every node must use the same scheme")
    ca_file = _optional_file(cfg, "ca_file")
    if ca_file and schemes != {"https"}:
        raise ValueError("ca_file: only used with an https:// addr")
    namespace = _string(cfg, "namespace", "") or None
    if namespace is not None and not _MOUNT_RE.fullmatch(namespace.strip("/")):
        raise ValueError(f"namespace: not a Vault namespace path: {namespace!r}")
    token_file = _optional_file(cfg, "token_file")
    role_file = _optional_file(cfg, "approle_role_id_file")
    secret_file = _optional_file(cfg, "approle_secret_id_file")
    source: TokenFile | AppRole
    if token_file and (role_file or secret_file):
        raise ValueError("token_file: set either token_file or the approle_* files, not both")
    if token_file:
        if "approle_mount" in cfg:
            raise ValueError("approle_mount: only used with AppRole login")
        source = TokenFile(Path(token_file))
    elif role_file and secret_file:
        source = AppRole(
            Path(role_file), Path(secret_file), _mount(cfg, "approle_mount", "approle")
        )
    elif role_file or secret_file:
        missing = "approle_secret_id_file" if role_file else "approle_role_id_file"
        raise ValueError(
            f"{missing}: AppRole login needs both approle_role_id_file and approle_secret_id_file"
        )
    else:
        raise ValueError(
            "token_file: set token_file, or approle_role_id_file and approle_secret_id_file"
        )
    tenant_mounts = cfg.get("tenant_mounts", {})
    if not isinstance(tenant_mounts, Mapping):
        raise ValueError('tenant_mounts: must be a table of tenant = "mount"')
    for tenant, mount in tenant_mounts.items():
        if not isinstance(tenant, str) or not valid_part(tenant):
            raise ValueError(f"tenant_mounts: {tenant!r} is not a tenant name")
        if not isinstance(mount, str) or not _MOUNT_RE.fullmatch(mount):
            raise ValueError(f"tenant_mounts.{tenant}: not a mount path: {mount!r}")
    key_prefix = _string(cfg, "key_prefix", "signerd-")
    if not _PREFIX_RE.fullmatch(key_prefix):
        raise ValueError(f"key_prefix: must match [A-Za-z0-9_-]{{0,64}}, got {key_prefix!r}")
    timeout = cfg.get("timeout", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise ValueError(f"timeout: must be seconds in (0, 300], got {timeout!r}")
    concurrency = cfg.get("max_concurrency", 8)
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= 64
    ):
        raise ValueError(f"max_concurrency: must be an integer from 1 to 64, got {concurrency!r}")
    interval = cfg.get("health_interval", 1.0)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0.1 <= interval <= 3600
    ):
        raise ValueError(f"health_interval: must be seconds in [0.1, 3600], got {interval!r}")
    return VaultSettings(
        addr=addr,
        addrs=addrs,
        health_interval=float(interval),
        source=source,
        namespace=namespace,
        ca_file=ca_file,
        mount=_mount(cfg, "mount", "transit"),
        tenant_mounts=dict(tenant_mounts),
        key_prefix=key_prefix,
        metadata_mount=_mount(cfg, "metadata_mount", "secret"),
        timeout=float(timeout),
        max_concurrency=concurrency,
    )


def _addrs(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """``addr``: one URL, or a list of a cluster's node URLs in failover order."""
    raw = cfg.get("addr")
    if raw is None:
        raise ValueError("addr: required")
    items = [raw] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not 1 <= len(items) <= _MAX_ADDRS:
        raise ValueError(f"addr: must be a URL or a list of 1 to {_MAX_ADDRS} URLs")
    addrs: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError("addr: each address must be a string")
        url = urlsplit(item)
        try:
            port = url.port
        except ValueError:
            port = -1
        if (
            url.scheme not in ("http", "https")
            or not url.hostname
            or port == -1
            or url.path not in ("", "/")
            or url.query
            or url.fragment
            or url.username is not None
            or not item.isprintable()
        ):
            raise ValueError(f"addr: must be http(s)://host[:port], got {item[:200]!r}")
        if url.scheme == "http" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
            log.warning(
                "signerd.vault.plain_http addr=%s advice=%s", item, "use https in production"
            )
        if item.rstrip("/") in addrs:
            raise ValueError(f"addr: {item[:200]!r} is listed twice")
        addrs.append(item.rstrip("/"))
    return tuple(addrs)


def _string(cfg: Mapping[str, Any], key: str, default: str | None) -> str:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"{key}: required")
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string, got {value!r}")
    return value


def _mount(cfg: Mapping[str, Any], key: str, default: str) -> str:
    value = _string(cfg, key, default).strip("/")
    if not _MOUNT_RE.fullmatch(value):
        raise ValueError(f"{key}: not a mount path: {value!r}")
    return value


def _optional_file(cfg: Mapping[str, Any], key: str) -> str | None:
    value = _string(cfg, key, "")
    if not value:
        return None
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{key}: not a readable file: {value!r}")
    return value
