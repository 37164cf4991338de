"""Who may do what: the ``[policy]`` section of the configuration.

Default deny. Each ``[[policy.rules]]`` entry names callers and what they are
granted; a call is allowed when a rule that matches the caller grants its
operation on its tenant and key. Rules are tried in order and the first one
that grants the call decides, so its rate limit is the one charged.

Callers (a rule needs at least one selector; all the kinds it has must match,
any entry of a list may)::

    users  = ["gateway"]                # user names, or ["*"] for anyone who can connect
    uids   = [1001]                     # numeric uids (same test as users: either list)
    groups = ["signer-ops"]             # group names: primary or supplementary group
    gids   = [2000]                     # numeric gids (same test as groups)
    units  = ["gateway.service"]        # systemd unit of the caller; fnmatch patterns

Grants::

    tenants    = ["acme"]               # or ["*"]: every tenant, and cross-tenant listing
    keys       = ["feedback", "tel-*"]  # fnmatch on NAME within the tenant; default ["*"]
    operations = ["sign", "verify", "jwks"]
    rate  = 50.0                        # optional: requests per second, per caller
    burst = 100                         # optional: bucket size, default ceil(rate)

User and group names are resolved when the policy is loaded, so a name that
does not exist is a configuration error, not a silent non-match. ``health``
is always allowed and cannot be listed. Admin operations (create, rotate,
promote, retire, destroy, and trust: adding and retiring trusted peer keys)
are granted only by naming them.

Rate limits are token buckets per (rule, uid, unit): the uid is the identity
the kernel vouches for; a pid would let a caller reset its bucket by forking
and pids get reused.

Callers that no rule matches (who could be granted nothing) are refused before
their request body is read, and are rate limited per uid by one more bucket::

    [policy]
    unmatched_rate  = 1.0               # refusals per second per uid; default 1.0
    unmatched_burst = 60                # bucket size; default 60

Refusals of callers some rule matches (403, a bad body, anything answered
before a rule granted the request something) cost one token of their uid's
refusal bucket, whatever the rules' rates (a rule may have none)::

    [policy]
    refusal_rate  = 5.0                 # refusals per second per uid; default 5.0
    refusal_burst = 60                  # bucket size; default 60

Past either bucket, or a rule's rate, the answer is 429 ``rate_limited``, and
the audit trail records at most one 429 per uid per second, across workers
(with the count of the others), so the records any one uid can cause per
second are bounded.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import grp
import math
import pwd
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import PermissionDenied, RateLimited
from ..wire._names import KeyName, valid_part
from ._calls import GRANTED, Call, Operation, Peer

if TYPE_CHECKING:
    from ..workers import SharedBuckets

__all__ = ["Policy", "Rule", "policy_from_config"]

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
_MAX_BUCKETS = 4096
_UNMATCHED = "\0unmatched"  # the bucket label of callers no rule matches (no rule can have it)
_REFUSED = "\0refused"  # refusals of callers some rule matches
_QUIET = "\0quiet"  # audit records of 429s: one per uid per second
_QUIET_RATE = 1.0
DEFAULT_UNMATCHED_RATE = 1.0
DEFAULT_UNMATCHED_BURST = 60
DEFAULT_REFUSAL_RATE = 5.0
DEFAULT_REFUSAL_BURST = 60
_POLICY_KEYS = ("rules", "unmatched_rate", "unmatched_burst", "refusal_rate", "refusal_burst")


@dataclass(frozen=True)
class Rule:
    label: str
    uids: frozenset[int] | None  # None: any uid
    gids: frozenset[int] | None  # None: any group
    units: tuple[str, ...] | None  # None: any unit, or none
    tenants: frozenset[str] | None  # None: every tenant
    keys: tuple[str, ...]
    operations: frozenset[Operation]
    rate: float | None = None
    burst: int = 0

    def matches(self, peer: Peer) -> bool:
        if self.uids is not None and peer.uid not in self.uids:
            return False
        if (
            self.gids is not None
            and peer.gid not in self.gids
            and self.gids.isdisjoint(peer.groups)
        ):
            return False
        if self.units is not None:
            unit = peer.unit
            if unit is None or not any(fnmatch.fnmatchcase(unit, p) for p in self.units):
                return False
        return True

    def grants(self, operation: Operation, tenant: str | None, key: KeyName | None) -> bool:
        if operation not in self.operations:
            return False
        if tenant is None:
            return self.tenants is None
        if self.tenants is not None and tenant not in self.tenants:
            return False
        return key is None or any(fnmatch.fnmatchcase(key.name, p) for p in self.keys)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class _Limiter:
    """Token buckets, shared by the request handlers; the only mutable part of a policy.

    With ``shared`` (the workers' ``SharedBuckets``, mapped by every worker
    process) the buckets live there, so a caller spread over several workers
    is charged once per request, not once per worker.
    """

    def __init__(
        self,
        buckets: dict[tuple[str, int, str | None], _Bucket] | None = None,
        shared: SharedBuckets | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._buckets = buckets or {}
        self.shared = shared

    def take(self, rule: Rule, peer: Peer) -> bool:
        assert rule.rate is not None
        return self.take_from((rule.label, peer.uid, peer.unit), rule.rate, rule.burst)

    def take_from(self, ident: tuple[str, int, str | None], rate: float, burst: int) -> bool:
        now = time.monotonic()
        if self.shared is not None:
            return self.shared.take(ident, rate, burst, now)
        with self._lock:
            bucket = self._buckets.get(ident)
            if bucket is None:
                if len(self._buckets) >= _MAX_BUCKETS:
                    self._prune(now)
                bucket = self._buckets[ident] = _Bucket(float(burst), now)
            else:
                elapsed = max(0.0, now - bucket.stamp)
                bucket.tokens = min(float(burst), bucket.tokens + elapsed * rate)
                bucket.stamp = now
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True

    def _prune(self, now: float) -> None:
        # drop the buckets idle the longest; they would be full again anyway
        for ident, _ in sorted(self._buckets.items(), key=lambda kv: kv[1].stamp)[
            : _MAX_BUCKETS // 2
        ]:
            del self._buckets[ident]

    def carried(self, rules: tuple[Rule, ...], bursts: dict[str, int]) -> _Limiter:
        """The buckets of ``rules`` and of the labels in ``bursts``, capped at their bursts."""
        if self.shared is not None:  # the shared table keeps the state; takes cap it at burst
            return _Limiter(shared=self.shared)
        bursts = {**bursts, **{r.label: r.burst for r in rules if r.rate is not None}}
        with self._lock:
            kept = {
                ident: _Bucket(min(b.tokens, float(bursts[ident[0]])), b.stamp)
                for ident, b in self._buckets.items()
                if ident[0] in bursts
            }
        return _Limiter(kept)


@dataclass(frozen=True)
class Policy:
    """An immutable rule set; implements the ``Gate`` protocol."""

    rules: tuple[Rule, ...]
    limiter: _Limiter = field(default_factory=_Limiter, compare=False, repr=False)
    unmatched_rate: float = DEFAULT_UNMATCHED_RATE
    unmatched_burst: int = DEFAULT_UNMATCHED_BURST
    refusal_rate: float = DEFAULT_REFUSAL_RATE
    refusal_burst: int = DEFAULT_REFUSAL_BURST

    def admits(self, peer: Peer) -> bool:
        """Whether any rule could grant ``peer`` anything; cheap, checked before a body is read.

        A caller no rule matches is charged to its uid's bucket for such callers:
        RateLimited when it is empty, else False (the server answers 403).
        """
        if any(rule.matches(peer) for rule in self.rules):
            return True
        ident = (_UNMATCHED, peer.uid, None)
        if not self.limiter.take_from(ident, self.unmatched_rate, self.unmatched_burst):
            raise RateLimited("over the rate limit for callers without a grant")
        return False

    def authorize(self, call: Call) -> None:
        """Return if the call may proceed; raise PermissionDenied or RateLimited."""
        op = call.operation
        if op is Operation.HEALTH:
            return
        tenant, key = call.tenant, call.key
        if key is not None and tenant != key.tenant:
            raise PermissionDenied()  # inconsistent call: fail closed
        for rule in self.rules:
            if rule.matches(call.peer) and rule.grants(op, tenant, key):
                if rule.rate is not None and not self.limiter.take(rule, call.peer):
                    raise RateLimited(f"caller is over its rate limit of {rule.rate:g}/s")
                GRANTED.set(True)
                return
        raise PermissionDenied(f"caller may not {op.value} {_target(tenant, key)}")

    def charge_refusal(self, peer: Peer) -> None:
        """One refusal of a caller some rule matches, from its uid's bucket; RateLimited past it."""
        ident = (_REFUSED, peer.uid, None)
        if not self.limiter.take_from(ident, self.refusal_rate, self.refusal_burst):
            raise RateLimited(f"caller is over its rate of {self.refusal_rate:g} refusals/s")

    def records_limited(self, peer: Peer) -> bool:
        """Whether a 429 answered to ``peer`` now gets an audit record: one per uid per second."""
        return self.limiter.take_from((_QUIET, peer.uid, None), _QUIET_RATE, 1)

    def allowed_tenants(self, peer: Peer, op: Operation) -> frozenset[str] | None:
        """Tenants ``peer`` may ``op`` in (None: all of them)."""
        if op is Operation.HEALTH:
            return None
        tenants: set[str] = set()
        for rule in self.rules:
            if op in rule.operations and rule.matches(peer):
                if rule.tenants is None:
                    return None
                tenants |= rule.tenants
        return frozenset(tenants)

    def visible(self, peer: Peer, op: Operation, key: KeyName) -> bool:
        """Whether ``peer`` may ``op`` this key; for filtering lists and JWKS."""
        if op is Operation.HEALTH:
            return True
        return any(r.matches(peer) and r.grants(op, key.tenant, key) for r in self.rules)

    def with_state_from(self, old: Policy) -> Policy:
        """This policy, keeping the rate-limit buckets of ``old`` for rules of the same name."""
        bursts = {
            _UNMATCHED: self.unmatched_burst,
            _REFUSED: self.refusal_burst,
            _QUIET: 1,
        }
        return dataclasses.replace(self, limiter=old.limiter.carried(self.rules, bursts))


def _target(tenant: str | None, key: KeyName | None) -> str:
    if key is not None:
        return f"key {key}"
    if tenant is not None:
        return f"in tenant {tenant!r}"
    return "across tenants"


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
        limiter=_Limiter(shared=buckets),
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


def names_caller(gate: object, peer: Peer, *, groups: bool, unit: bool) -> bool | None:
    """Whether a rule that names callers (by uid or user, group or gid, or unit; not
    ``users = ["*"]`` alone) matches ``peer``. Charges no bucket; the listener keeps a share
    of its connections for such callers. ``groups``, ``unit``: whether ``peer`` carries its
    supplementary groups and its unit; None when what it lacks could still make a rule
    match. A gate that is not a ``Policy`` names every caller."""
    if not isinstance(gate, Policy):
        return True
    undecided = False
    for rule in gate.rules:
        if rule.uids is None and rule.gids is None and rule.units is None:
            continue
        if rule.matches(peer):
            return True
        if rule.uids is not None and peer.uid not in rule.uids:
            continue
        gid_ok = rule.gids is None or peer.gid in rule.gids or not rule.gids.isdisjoint(peer.groups)
        unit_ok = rule.units is None or (
            peer.unit is not None and any(fnmatch.fnmatchcase(peer.unit, p) for p in rule.units)
        )
        if (groups or gid_ok) and (unit or unit_ok):
            continue  # what the peer carries already rules this one out
        undecided = True
    return None if undecided else False
