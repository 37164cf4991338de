"""Who may do what: the rules of the ``[policy]`` section, and their rate limits.

The syntax and meaning of ``[policy]`` are documented in config/signerd.example.toml;
``_parse`` reads the table into the ``Policy`` here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import PermissionDenied, RateLimited
from ..wire import KeyName
from ._calls import GRANTED, Call, Operation, Peer

if TYPE_CHECKING:
    from ..workers import SharedBuckets

__all__ = ["Limiter", "Policy", "Rule", "names_caller"]

_MAX_BUCKETS = 4096
_UNMATCHED = "\0unmatched"  # the bucket label of callers no rule matches (no rule can have it)
_REFUSED = "\0refused"  # refusals of callers some rule matches
_QUIET = "\0quiet"  # audit records of 429s: one per uid per second
_QUIET_RATE = 1.0
DEFAULT_UNMATCHED_RATE = 1.0
DEFAULT_UNMATCHED_BURST = 60
DEFAULT_REFUSAL_RATE = 5.0
DEFAULT_REFUSAL_BURST = 60


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
    #: ``keys`` and ``units`` as one compiled match each (``fnmatchcase`` of any pattern)
    _key_match: Callable[[str], object] = field(init=False, repr=False, compare=False)
    _unit_match: Callable[[str], object] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_key_match", _any_of(self.keys))
        object.__setattr__(self, "_unit_match", _any_of(self.units or ()))

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
            if unit is None or not self._unit_match(unit):
                return False
        return True

    def grants(self, operation: Operation, tenant: str | None, key: KeyName | None) -> bool:
        if operation not in self.operations:
            return False
        if tenant is None:
            return self.tenants is None
        if self.tenants is not None and tenant not in self.tenants:
            return False
        return key is None or self._key_match(key.name) is not None


def _any_of(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """A match of a whole text against any of ``patterns`` (``fnmatchcase``'s translation):
    a match object, or None."""
    if not patterns:
        return lambda text: None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)).match


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class Limiter:
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

    def carried(self, rules: tuple[Rule, ...], bursts: dict[str, int]) -> Limiter:
        """The buckets of ``rules`` and of the labels in ``bursts``, capped at their bursts."""
        if self.shared is not None:  # the shared table keeps the state; takes cap it at burst
            return Limiter(shared=self.shared)
        bursts = {**bursts, **{r.label: r.burst for r in rules if r.rate is not None}}
        with self._lock:
            kept = {
                ident: _Bucket(min(b.tokens, float(bursts[ident[0]])), b.stamp)
                for ident, b in self._buckets.items()
                if ident[0] in bursts
            }
        return Limiter(kept)


@dataclass(frozen=True)
class Policy:
    """An immutable rule set; implements the ``Gate`` protocol."""

    rules: tuple[Rule, ...]
    limiter: Limiter = field(default_factory=Limiter, compare=False, repr=False)
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
