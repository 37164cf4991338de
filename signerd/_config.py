"""The TOML configuration: parsed once, validated, every error naming its key.

``config/signerd.example.toml`` explains every key. Backend, audit and policy
tables are validated by their own modules; a failure there is reported with
the table's path in front of the module's message. A ``*_file`` value
``credential:NAME`` names a systemd credential (``$CREDENTIALS_DIRECTORY/NAME``).
"""

from __future__ import annotations

import importlib.util
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .federation._settings import FederationSettings, parse_federation
from .forwarding import ForwardingSettings, forwarding_settings
from .keys import Settings
from .server import Limits
from .wire import DEFAULT_JWK_ALG, JWK_ALGS, KeyName, valid_part

CREDENTIAL_PREFIX = "credential:"
_CREDENTIAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,254}")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key."""


def credential_path(name: str) -> str:
    """The file of credential ``name`` in ``$CREDENTIALS_DIRECTORY``; ValueError if none."""
    if not _CREDENTIAL_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError("not a credential name ([A-Za-z0-9][A-Za-z0-9_.@-]*)")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory or not os.path.isabs(directory):
        raise ValueError(
            f"credential {name!r} needs $CREDENTIALS_DIRECTORY (LoadCredential= in the unit)"
        )
    return os.path.join(directory, name)


@dataclass(frozen=True)
class Config:
    path: str
    socket: str
    socket_mode: int
    socket_group: str | None
    log_level: str
    limits: Limits
    settings: Settings
    default_backend: str
    tenant_backends: Mapping[str, str]
    backends: Mapping[str, Mapping[str, Any]]
    bootstrap: tuple[KeyName, ...]
    audit: Mapping[str, Any]
    policy: Mapping[str, Any] = field(default_factory=dict)
    workers: int = field(default_factory=lambda: default_workers())
    on_loop: bool = True  # workers sign and write the audit trail on the loop's thread
    event_loop: str = "auto"  # "auto" (uvloop when installed), "uvloop" or "asyncio"
    federation: FederationSettings = field(default_factory=FederationSettings)
    jwk_alg: str = DEFAULT_JWK_ALG  # the "alg" of the JWKs signerd serves
    metrics: bool = True  # GET /metrics collects and answers ([metrics] enabled)
    max_key_series: int = 1000  # keys with their own series in /metrics at most
    forwarding: ForwardingSettings | None = None  # no [forwarding]: the trail stays local


_AGE_PATTERN_RE = re.compile(r"[a-z0-9_*?-]{1,63}/[a-z0-9_*?-]{1,63}")
_MAX_AGE_RULES = 64
_MAX_KEY_SERIES = 100_000


def _age_rules(table: Any) -> tuple[tuple[str, float], ...]:
    """``[keys.max_active_age]``: TENANT/NAME patterns (``*`` and ``?``) to seconds."""
    if not isinstance(table, dict):
        raise ConfigError('keys.max_active_age: must be a table of "TENANT/NAME" = seconds')
    if len(table) > _MAX_AGE_RULES:
        raise ConfigError(f"keys.max_active_age: at most {_MAX_AGE_RULES} patterns")
    rules: list[tuple[str, float]] = []
    for pattern in table:
        if _AGE_PATTERN_RE.fullmatch(pattern) is None:
            raise ConfigError(
                f"keys.max_active_age.{pattern}: not a TENANT/NAME pattern ([a-z0-9_-], * and ?)"
            )
        value = _get(table, "keys.max_active_age", pattern, float, 0.0)
        if not 0 < value < 1e12:
            raise ConfigError(f"keys.max_active_age.{pattern}: must be seconds > 0")
        rules.append((pattern, value))
    return tuple(rules)


_TOP = {
    "server",
    "keys",
    "backends",
    "tenants",
    "audit",
    "policy",
    "federation",
    "metrics",
    "forwarding",
}
_METRICS = {"enabled", "max_key_series"}  # [metrics]
_LIMITS = (  # [server] keys that are fields of Limits
    "max_body_bytes",
    "max_batch_items",
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "max_connections",
    "max_connections_per_uid",
    "max_connections_stranger",
    "max_connections_strangers",
)
_SERVER = {
    "socket",
    "socket_mode",
    "socket_group",
    "log_level",
    "workers",
    "on_loop",
    "jwk_alg",
    "event_loop",
    *_LIMITS,
}
_KEYS = {
    "default_backend",
    "bootstrap",
    "backend_timeout",
    "max_batch",
    "max_in_flight",
    "refresh_interval",
    "unknown_kid_refresh",
    "retain_verify_only",
    "idempotency_ttl",
    "idempotency_max_entries",
    "max_active_age",
    "deletion_wait",
}
_LOG_LEVELS = {"debug", "info", "warning", "error"}
_MODE_RE = re.compile(r"0?[0-7]{3}")  # ASCII octal permission bits: no 0o, no "_", no setuid
_MAX_WORKERS = 64
_MAX_DELETION_WAIT = 10 * 366 * 86400


def default_workers() -> int:
    """``server.workers`` when not set: the CPUs this process may run on, at least 2."""
    return max(2, len(os.sched_getaffinity(0)))


def _table(doc: Mapping[str, Any], name: str, allowed: set[str] | None) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: must be a table")
    if allowed is not None:
        for key in value:
            if key not in allowed:
                raise ConfigError(f"{name}.{key}: unknown key")
    return value


def _get(table: Mapping[str, Any], path: str, key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}.{key}: must be {kind.__name__}, got {value!r}")
    return value


def _positive(path: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{path}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def load(path: str) -> Config:
    try:
        with open(path, "rb") as fh:
            doc = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse(doc, path=path)


def parse(doc: Mapping[str, Any], *, path: str = "<config>") -> Config:
    for key in doc:
        if key not in _TOP:
            raise ConfigError(f"{key}: unknown top-level key (known: {', '.join(sorted(_TOP))})")
    base = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()

    server = _table(doc, "server", _SERVER)
    socket_path = _get(server, "server", "socket", str, "/run/signerd/signerd.sock")
    mode_text = _get(server, "server", "socket_mode", str, "0660")
    if _MODE_RE.fullmatch(mode_text) is None:
        raise ConfigError(
            f"server.socket_mode: must be an octal string like '0660', got {mode_text!r}"
        )
    socket_mode = int(mode_text, 8)
    if socket_mode & 0o007:
        raise ConfigError(
            f"server.socket_mode: must not grant anything to others, got {mode_text!r}"
        )
    group = server.get("socket_group")
    if group is not None and not isinstance(group, str):
        raise ConfigError("server.socket_group: must be a group name")
    log_level = _get(server, "server", "log_level", str, "info")
    if log_level not in _LOG_LEVELS:
        raise ConfigError(f"server.log_level: one of {sorted(_LOG_LEVELS)}, got {log_level!r}")
    d_limits = Limits()
    limits = Limits(
        **{
            name: _get(
                server, "server", name, type(getattr(d_limits, name)), getattr(d_limits, name)
            )
            for name in _LIMITS
        }
    )
    for name in _LIMITS:
        _positive(f"server.{name}", getattr(limits, name))
    if limits.max_connections_strangers * 2 > limits.max_connections:
        raise ConfigError(
            "server.max_connections_strangers: at most half of server.max_connections "
            f"(the rest is kept for callers a rule names), got {limits.max_connections_strangers}"
        )
    workers = _get(server, "server", "workers", int, default_workers())
    if not 1 <= workers <= _MAX_WORKERS:
        raise ConfigError(f"server.workers: must be 1 to {_MAX_WORKERS}, got {workers!r}")
    on_loop = _get(server, "server", "on_loop", bool, True)
    jwk_alg = _get(server, "server", "jwk_alg", str, DEFAULT_JWK_ALG)
    if jwk_alg not in JWK_ALGS:
        raise ConfigError(f"server.jwk_alg: one of {list(JWK_ALGS)}, got {jwk_alg!r}")
    event_loop = _get(server, "server", "event_loop", str, "auto")
    if event_loop not in ("auto", "uvloop", "asyncio"):
        raise ConfigError("server.event_loop: must be auto, uvloop or asyncio")
    if event_loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise ConfigError("server.event_loop: uvloop is not installed (pip install uvloop)")

    keys = _table(doc, "keys", _KEYS)
    d = Settings()
    settings = Settings(
        backend_timeout=_get(keys, "keys", "backend_timeout", float, d.backend_timeout),
        max_batch=_get(keys, "keys", "max_batch", int, d.max_batch),
        max_in_flight=_get(keys, "keys", "max_in_flight", int, d.max_in_flight),
        refresh_interval=_get(keys, "keys", "refresh_interval", float, d.refresh_interval),
        unknown_kid_refresh=_get(keys, "keys", "unknown_kid_refresh", float, d.unknown_kid_refresh),
        retain_verify_only=_get(keys, "keys", "retain_verify_only", int, d.retain_verify_only),
        idempotency_ttl=_get(keys, "keys", "idempotency_ttl", float, d.idempotency_ttl),
        idempotency_max_entries=_get(
            keys, "keys", "idempotency_max_entries", int, d.idempotency_max_entries
        ),
        max_active_age=_age_rules(keys.get("max_active_age", {})),
        deletion_wait=_get(keys, "keys", "deletion_wait", float, d.deletion_wait),
    )
    _positive("keys.backend_timeout", settings.backend_timeout)
    _positive("keys.max_batch", settings.max_batch)
    _positive("keys.max_in_flight", settings.max_in_flight)
    _positive("keys.refresh_interval", settings.refresh_interval, zero_ok=True)
    _positive("keys.unknown_kid_refresh", settings.unknown_kid_refresh, zero_ok=True)
    _positive("keys.retain_verify_only", settings.retain_verify_only, zero_ok=True)
    _positive("keys.idempotency_ttl", settings.idempotency_ttl)
    _positive("keys.idempotency_max_entries", settings.idempotency_max_entries)
    if not 0 <= settings.deletion_wait <= _MAX_DELETION_WAIT:  # also refuses nan
        raise ConfigError(
            f"keys.deletion_wait: seconds from 0 to {_MAX_DELETION_WAIT} (10 years), "
            f"got {settings.deletion_wait!r}"
        )

    backends = _table(doc, "backends", None)
    if not backends:
        raise ConfigError("backends: at least one backend table is required, e.g. [backends.hsm]")
    resolved: dict[str, dict[str, Any]] = {}
    for name, table in backends.items():
        if not valid_part(name):
            raise ConfigError(f"backends.{name}: backend names are [a-z0-9][a-z0-9_-]*")
        if not isinstance(table, dict) or not isinstance(table.get("type"), str):
            raise ConfigError(f"backends.{name}.type: required (one of pkcs11, vault)")
        resolved[name] = {
            k: _secret_file(f"backends.{name}.{k}", base, v)
            if k.endswith(("_file", "module"))
            else v
            for k, v in table.items()
        }
    default_backend = _get(keys, "keys", "default_backend", str, next(iter(backends)))
    if default_backend not in backends:
        raise ConfigError(f"keys.default_backend: no backend named {default_backend!r}")

    tenants = _table(doc, "tenants", None)
    routes: dict[str, str] = {}
    for tenant, table in tenants.items():
        if not valid_part(tenant):
            raise ConfigError(f"tenants.{tenant}: not a valid tenant name")
        if not isinstance(table, dict) or set(table) - {"backend"}:
            raise ConfigError(f"tenants.{tenant}: only 'backend' may be set")
        target = table.get("backend", default_backend)
        if target not in backends:
            raise ConfigError(f"tenants.{tenant}.backend: no backend named {target!r}")
        routes[tenant] = target

    boot = keys.get("bootstrap", [])
    if not isinstance(boot, list):
        raise ConfigError("keys.bootstrap: must be a list of TENANT/NAME")
    bootstrap: list[KeyName] = []
    for i, item in enumerate(boot):
        try:
            bootstrap.append(KeyName.parse(item))
        except Exception as exc:
            raise ConfigError(f"keys.bootstrap[{i}]: not a key name TENANT/NAME: {item!r}") from exc

    audit = dict(_table(doc, "audit", None))
    if "path" not in audit:
        raise ConfigError("audit.path: required (the audit trail file)")
    for name in ("path", "anchor", "key"):  # the anchor file and the payload key: [audit]
        if name in audit:
            audit[name] = _relative(base, audit[name])

    forward = dict(_table(doc, "forwarding", None))
    for name in ("state", "tls_ca_file"):
        if name in forward:
            forward[name] = _relative(base, forward[name])
    try:
        forwarding = forwarding_settings(forward, str(audit["path"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    try:
        federation = parse_federation(_table(doc, "federation", None), base)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc

    metrics = _table(doc, "metrics", _METRICS)
    max_key_series = _get(metrics, "metrics", "max_key_series", int, 1000)
    if not 1 <= max_key_series <= _MAX_KEY_SERIES:
        raise ConfigError(f"metrics.max_key_series: must be 1 to {_MAX_KEY_SERIES}")

    return Config(
        path=os.path.abspath(path) if path != "<config>" else path,
        socket=_relative(base, socket_path),
        socket_mode=socket_mode,
        socket_group=group,
        log_level=log_level,
        limits=limits,
        settings=settings,
        default_backend=default_backend,
        tenant_backends=routes,
        backends=resolved,
        bootstrap=tuple(bootstrap),
        audit=audit,
        policy=_table(doc, "policy", None),
        workers=workers,
        on_loop=on_loop,
        event_loop=event_loop,
        federation=federation,
        jwk_alg=jwk_alg,
        metrics=_get(metrics, "metrics", "enabled", bool, True),
        max_key_series=max_key_series,
        forwarding=forwarding,
    )


def _secret_file(key: str, base: str, value: Any) -> Any:
    """A ``*_file`` value: ``credential:NAME`` is the file NAME in $CREDENTIALS_DIRECTORY.

    systemd's ``LoadCredential=NAME:/etc/signerd/credentials/NAME`` puts the
    secret there, readable only by the service; other values are paths.
    """
    if isinstance(value, str) and value.startswith(CREDENTIAL_PREFIX):
        try:
            return credential_path(value[len(CREDENTIAL_PREFIX) :])
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from exc
    return _relative(base, value)


def _relative(base: str, value: Any) -> Any:
    """Relative paths in the configuration are relative to the file itself."""
    if (
        isinstance(value, str)
        and value
        and not os.path.isabs(value)
        and not value.startswith("pkcs11:")
    ):
        return os.path.normpath(os.path.join(base, value))
    return value
