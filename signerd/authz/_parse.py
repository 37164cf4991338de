"""Reading the ``[policy]`` table into a ``Policy``; every error names the bad key.

The syntax and meaning of ``[policy]`` are documented in config/signerd.example.toml.
"""

from __future__ import annotations

import grp
import math
import pwd
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..wire import valid_part
from ._calls import Operation
from ._policy import (
    DEFAULT_REFUSAL_BURST,
    DEFAULT_REFUSAL_RATE,
    DEFAULT_UNMATCHED_BURST,
    DEFAULT_UNMATCHED_RATE,
    Limiter,
    Policy,
    Rule,
)

if TYPE_CHECKING:
    from ..workers import SharedBuckets

__all__ = ["policy_from_config"]

_Resolve = Callable[[str, str], int]

_RULE_KEYS = (
    "name",
    "users",
    "uids",
    "groups",
    "gids",
    "units",
    "tenants",
    "keys",
    "operations",
    "rate",
    "burst",
)
_UNIT_PATTERN = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]-]{1,255}")
_KEY_PATTERN = re.compile(r"[a-z0-9_*?\[\]!-]{1,63}")
_POLICY_KEYS = ("rules", "unmatched_rate", "unmatched_burst", "refusal_rate", "refusal_burst")


def policy_from_config(table: Mapping[str, Any], buckets: SharedBuckets | None = None) -> Policy:
    """Build a Policy from the ``[policy]`` table; ValueError names the bad key.

    ``buckets``: the rate-limit table shared by the worker processes (None: this process's own).
    """
    if not isinstance(table, Mapping):
        raise ValueError("policy: must be a table")
    for name in table:
        if name not in _POLICY_KEYS:
            raise ValueError(f"policy: unknown key {name!r}")
    raw_rules = table.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ValueError("policy.rules: must be an array of tables ([[policy.rules]])")
    rules = tuple(_rule(f"policy.rules[{i}]", i, raw) for i, raw in enumerate(raw_rules))
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        if rule.label in seen:
            raise ValueError(f"policy.rules[{i}].name: duplicate rule name {rule.label!r}")
        seen.add(rule.label)
    rate, burst = _bucket(table, "unmatched", DEFAULT_UNMATCHED_RATE, DEFAULT_UNMATCHED_BURST)
    refusal_rate, refusal_burst = _bucket(
        table, "refusal", DEFAULT_REFUSAL_RATE, DEFAULT_REFUSAL_BURST
    )
    return Policy(
        rules,
        limiter=Limiter(shared=buckets),
        unmatched_rate=rate,
        unmatched_burst=burst,
        refusal_rate=refusal_rate,
        refusal_burst=refusal_burst,
    )


def _bucket(
    table: Mapping[str, Any], prefix: str, default_rate: float, default_burst: int
) -> tuple[float, int]:
    """``policy.PREFIX_rate`` and ``policy.PREFIX_burst``, validated."""
    rate = table.get(f"{prefix}_rate", default_rate)
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
        raise ValueError(f"policy.{prefix}_rate: must be a positive number of requests per second")
    burst = table.get(f"{prefix}_burst", default_burst)
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"policy.{prefix}_burst: must be a positive integer")
    return float(rate), burst


def _rule(where: str, index: int, raw: object) -> Rule:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: must be a table")
    for name in raw:
        if name not in _RULE_KEYS:
            raise ValueError(f"{where}: unknown key {name!r}")
    if not any(k in raw for k in ("users", "uids", "groups", "gids", "units")):
        raise ValueError(f"{where}: needs at least one of users, uids, groups, gids, units")
    label = raw.get("name", f"rules[{index}]")
    if not isinstance(label, str) or not label:
        raise ValueError(f"{where}.name: must be a non-empty string")

    uids = _ids(where, "users", "uids", raw, _uid)
    gids = _ids(where, "groups", "gids", raw, _gid)
    units: tuple[str, ...] | None = None
    if "units" in raw:
        units = tuple(_strings(f"{where}.units", raw["units"]))
        for unit in units:
            if not _UNIT_PATTERN.fullmatch(unit):
                raise ValueError(f"{where}.units: not a systemd unit name or pattern: {unit!r}")

    if "tenants" not in raw:
        raise ValueError(f'{where}.tenants: required (a list of tenants, or ["*"])')
    tenant_list = _strings(f"{where}.tenants", raw["tenants"])
    tenants: frozenset[str] | None = None
    if "*" not in tenant_list:
        for tenant in tenant_list:
            if not valid_part(tenant):
                raise ValueError(f"{where}.tenants: not a tenant name: {tenant!r}")
        tenants = frozenset(tenant_list)

    keys = tuple(_strings(f"{where}.keys", raw.get("keys", ["*"])))
    for pattern in keys:
        if "/" in pattern:
            raise ValueError(
                f"{where}.keys: {pattern!r}: patterns match the NAME part only; "
                "put the tenant in 'tenants'"
            )
        if not _KEY_PATTERN.fullmatch(pattern):
            raise ValueError(f"{where}.keys: not a key name pattern: {pattern!r}")

    if "operations" not in raw:
        raise ValueError(f"{where}.operations: required")
    operations: set[Operation] = set()
    for name in _strings(f"{where}.operations", raw["operations"]):
        if name == Operation.HEALTH.value:
            raise ValueError(f"{where}.operations: 'health' is always allowed; do not list it")
        try:
            operations.add(Operation(name))
        except ValueError:
            raise ValueError(f"{where}.operations: unknown operation {name!r}") from None

    rate, burst = _rate(where, raw)
    return Rule(
        label=label,
        uids=uids,
        gids=gids,
        units=units,
        tenants=tenants,
        keys=keys,
        operations=frozenset(operations),
        rate=rate,
        burst=burst,
    )


def _strings(where: str, value: object) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: must be a non-empty list of strings")
    for item in value:
        if not isinstance(item, str) or not item:
            raise ValueError(f"{where}: must be a non-empty list of strings, got {item!r}")
    return list(value)


def _ids(
    where: str, names_key: str, ids_key: str, raw: Mapping[str, Any], resolve: _Resolve
) -> frozenset[int] | None:
    """The ids a rule's name list and numeric list allow together; None: any."""
    if names_key not in raw and ids_key not in raw:
        return None
    ids: set[int] = set()
    if names_key in raw:
        names = _strings(f"{where}.{names_key}", raw[names_key])
        if names_key == "users" and "*" in names:
            return None
        ids.update(resolve(f"{where}.{names_key}", name) for name in names)
    if ids_key in raw:
        numbers = raw[ids_key]
        if not isinstance(numbers, list) or not numbers:
            raise ValueError(f"{where}.{ids_key}: must be a non-empty list of numbers")
        for item in numbers:
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < 2**32 - 1:
                raise ValueError(f"{where}.{ids_key}: not a numeric id: {item!r}")
            ids.add(item)
    return frozenset(ids)


def _uid(where: str, name: str) -> int:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise ValueError(f"{where}: unknown user {name!r}") from None


def _gid(where: str, name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"{where}: unknown group {name!r}") from None


def _rate(where: str, raw: Mapping[str, Any]) -> tuple[float | None, int]:
    rate = raw.get("rate")
    burst = raw.get("burst")
    if rate is None:
        if burst is not None:
            raise ValueError(f"{where}.burst: needs 'rate'")
        return None, 0
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < math.inf:
        raise ValueError(f"{where}.rate: must be a positive number of requests per second")
    if burst is None:
        return float(rate), max(1, math.ceil(rate))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ValueError(f"{where}.burst: must be a positive integer")
    return float(rate), burst
