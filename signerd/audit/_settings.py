"""The ``[audit]`` settings: checked, with their defaults (see config/signerd.example.toml)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._anchor import load_key

__all__ = ["AuditSettings", "audit_settings", "default_key_path", "worker_path"]

_KNOWN = ("path", "journald", "write_timeout", "fsync", "anchor", "anchor_interval", "key")


@dataclass(frozen=True)
class AuditSettings:
    path: str  # the trail file (a worker's own, with worker=N)
    write_timeout: float
    fsync: bool
    journal_send: Callable[..., object] | None
    anchor: str  # the anchor file
    anchor_interval: float
    key: str  # the payload key file
    chains: tuple[str, ...] = ()  # every chain of the run (the trail files' names)


def _path_setting(table: Mapping[str, Any], name: str, default: str) -> str:
    value = table.get(name, default)
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"audit.{name}: must be a file path, got {value!r}")
    return value


def default_key_path(trail: str) -> str:
    """``audit.key`` when not set: in systemd's ``$STATE_DIRECTORY`` (signerd.service's
    ``StateDirectory=``, /var/lib/signerd), out of the log directory and its shipping;
    without one, beside the trail file ``trail``."""
    state = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(state):
        return os.path.join(state, "audit.key")
    return os.path.join(os.path.dirname(trail), "audit.key")


def _refuse_left_behind_key(trail: str, key: str) -> None:
    """An ``audit.key`` beside the trail (the default of earlier versions) while the default
    is now elsewhere and holds none: refuse rather than start a second key, under which
    new records' payload hashes would no longer match the old ones."""
    old = os.path.join(os.path.dirname(trail), "audit.key")
    if old != key and os.path.exists(old) and not os.path.exists(key):
        raise ValueError(
            f"audit.key: not set, and the default is now {key}, but an audit key is at {old}: "
            f"move it there (keep it out of the log directory) or set audit.key = {old!r}"
        )


def worker_path(path: str, worker: int) -> str:
    """``audit.jsonl`` -> ``audit.w0.jsonl``: the trail (its own chain) of one worker process."""
    root, ext = os.path.splitext(path)
    return f"{root}.w{worker}{ext}"


def audit_settings(
    table: Mapping[str, Any], *, worker: int | None = None, workers: int | None = None
) -> AuditSettings:
    """The ``[audit]`` table checked, with defaults filled in; ValueError names the bad key.
    ``worker`` of ``workers``: one worker's own trail, among ``workers`` chains."""
    for name in table:
        if name not in _KNOWN:
            raise ValueError(f"audit: unknown key {name!r}")
    path = table.get("path")
    if not isinstance(path, str) or not path or "\0" in path:
        raise ValueError("audit.path: required, the file the audit trail is appended to")
    timeout = table.get("write_timeout", 2.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 30:
        raise ValueError(f"audit.write_timeout: must be seconds in (0, 30], got {timeout!r}")
    interval = table.get("anchor_interval", 10)
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0.05 <= interval <= 3600
    ):
        raise ValueError(
            f"audit.anchor_interval: must be seconds in [0.05, 3600], got {interval!r}"
        )
    key = _path_setting(table, "key", default_key_path(path))
    if "key" not in table:
        _refuse_left_behind_key(path, key)
    chains: tuple[str, ...] = (os.path.basename(path),)
    if worker is not None:
        count = range(workers) if workers is not None else (worker,)
        chains = tuple(os.path.basename(worker_path(path, n)) for n in count)
        path = worker_path(path, worker)
    anchor = _path_setting(table, "anchor", path + ".anchor")
    if os.path.exists(key):  # created on first use when missing; a bad one is a config error
        try:
            load_key(key)
        except (OSError, ValueError) as exc:
            raise ValueError(f"audit.key: {exc}") from None
    flags = {}
    for name, default in (("journald", False), ("fsync", True)):
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise ValueError(f"audit.{name}: must be true or false, got {value!r}")
        flags[name] = value
    send: Callable[..., object] | None = None
    if flags["journald"]:
        try:
            journal = importlib.import_module("systemd.journal")
        except ImportError:
            raise ValueError(
                "audit.journald: needs systemd-python (the 'systemd' extra of the signerd wheel)"
            ) from None
        send = journal.send
    return AuditSettings(
        path, float(timeout), flags["fsync"], send, anchor, float(interval), key, chains
    )
