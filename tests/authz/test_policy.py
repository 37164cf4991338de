"""The policy: parsing errors that name the key, who may do what, tenant isolation, rate limits."""

from __future__ import annotations

import contextvars
import dataclasses
import re
import time
from typing import Any

import pytest

from signerd.authz import GRANTED, Call, Operation, Peer, Policy, names_caller, policy_from_config
from signerd.errors import PermissionDenied, RateLimited
from signerd.wire import KeyName

ADMIN = ["create", "rotate", "promote", "retire", "destroy"]

# uids/gids of accounts every Debian system has: daemon 1, nobody 65534, nogroup 65534, users 100
GATEWAY = Peer(pid=100, uid=65534, gid=65534, unit="gateway.service", user="nobody")
GATEWAY_OUTSIDE_UNIT = Peer(pid=101, uid=65534, gid=65534, unit=None, user="nobody")
OPERATOR = Peer(pid=200, uid=1, gid=1, groups=(100,), user="daemon")
STRANGER = Peer(pid=300, uid=4321, gid=4321)

POLICY: dict[str, Any] = {
    "rules": [
        {
            "name": "gateway",
            "users": ["nobody"],
            "units": ["gateway.service"],
            "tenants": ["acme"],
            "keys": ["feedback", "tel-*"],
            "operations": ["sign", "verify", "jwks"],
        },
        {
            "name": "operators",
            "groups": ["users"],
            "tenants": ["*"],
            "operations": ["list", "jwks", "verify", *ADMIN],
        },
        {
            "name": "public-keys",
            "users": ["*"],
            "tenants": ["globex"],
            "operations": ["jwks"],
        },
    ]
}


def call(peer: Peer, op: str, key: str | None = None, tenant: str | None = None) -> Call:
    name = KeyName.parse(key) if key else None
    return Call(peer, Operation(op), name.tenant if name else tenant, name)


def allowed(policy: Policy, c: Call) -> bool:
    try:
        policy.authorize(c)
    except PermissionDenied:
        return False
    return True


@pytest.fixture
def policy() -> Policy:
    return policy_from_config(POLICY)


# --- parsing --------------------------------------------------------------------


def rule(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"uids": [1000], "tenants": ["acme"], "operations": ["sign"]}
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"rules": [rule(), rule(), rule(operations=["sing"])]},
         "policy.rules[2].operations: unknown operation 'sing'"),
        ({"rules": [rule(operations=["health"])]},
         "policy.rules[0].operations: 'health' is always allowed"),
        ({"rules": [rule(operations=[])]}, "policy.rules[0].operations: must be a non-empty list"),
        ({"rules": [rule(operations=None)]}, "policy.rules[0].operations: required"),
        ({"rules": [rule(uids=None)]}, "policy.rules[0]: needs at least one of users"),
        ({"rules": [rule(users=["no-such-user-xyz"])]},
         "policy.rules[0].users: unknown user 'no-such-user-xyz'"),
        ({"rules": [rule(groups=["no-such-group-xyz"])]},
         "policy.rules[0].groups: unknown group 'no-such-group-xyz'"),
        ({"rules": [rule(uids=["1000"])]}, "policy.rules[0].uids: not a numeric id: '1000'"),
        ({"rules": [rule(gids=[-1])]}, "policy.rules[0].gids: not a numeric id: -1"),
        ({"rules": [rule(uids=[True])]}, "policy.rules[0].uids: not a numeric id: True"),
        ({"rules": [rule(units=["gateway service"])]},
         "policy.rules[0].units: not a systemd unit name or pattern"),
        ({"rules": [rule(tenants=None)]}, "policy.rules[0].tenants: required"),
        ({"rules": [rule(tenants=["Acme"])]}, "policy.rules[0].tenants: not a tenant name: 'Acme'"),
        ({"rules": [rule(keys=["acme/feedback"])]},
         "policy.rules[0].keys: 'acme/feedback': patterns match the NAME part only"),
        ({"rules": [rule(keys=["Feed"])]}, "policy.rules[0].keys: not a key name pattern: 'Feed'"),
        ({"rules": [rule(rate=0)]}, "policy.rules[0].rate: must be a positive number"),
        ({"rules": [rule(rate="10")]}, "policy.rules[0].rate: must be a positive number"),
        ({"rules": [rule(burst=5)]}, "policy.rules[0].burst: needs 'rate'"),
        ({"rules": [rule(rate=5, burst=0)]}, "policy.rules[0].burst: must be a positive integer"),
        ({"rules": [rule(name="a"), rule(name="a")]},
         "policy.rules[1].name: duplicate rule name 'a'"),
        ({"rules": [rule(tenant=["acme"])]}, "policy.rules[0]: unknown key 'tenant'"),
        ({"rules": [rule()], "default": "allow"}, "policy: unknown key 'default'"),
        ({"rules": {"name": "x"}}, "policy.rules: must be an array of tables"),
        ({"rules": ["x"]}, "policy.rules[0]: must be a table"),
        ({"refusal_rate": 0}, "policy.refusal_rate: must be a positive number"),
        ({"refusal_rate": True}, "policy.refusal_rate: must be a positive number"),
        ({"refusal_burst": 0}, "policy.refusal_burst: must be a positive integer"),
        ({"refusal_burst": 2.5}, "policy.refusal_burst: must be a positive integer"),
    ],
)  # fmt: skip
def test_invalid_policy_names_the_key(table: dict[str, Any], message: str) -> None:
    """Each invalid policy raises ValueError whose message starts with the key path."""
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        policy_from_config(table)


def test_empty_policy_denies_everything_but_health() -> None:
    """No rules: default deny; health is still answered."""
    policy = policy_from_config({})
    for op in Operation:
        if op is not Operation.HEALTH:
            assert not allowed(policy, call(OPERATOR, op.value, "acme/feedback"))
    policy.authorize(call(STRANGER, "health"))


def test_policy_is_immutable(policy: Policy) -> None:
    """A loaded policy cannot be changed in place (a reload builds a new one)."""
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.rules = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.rules[0].operations = frozenset()  # type: ignore[misc]


def test_names_are_resolved_at_load(policy: Policy) -> None:
    """User and group names become the ids the kernel reports."""
    assert policy.rules[0].uids == frozenset({65534})
    assert policy.rules[1].gids == frozenset({100})


# --- the matrix -------------------------------------------------------------------

CASES: list[tuple[Peer, str, str | None, str | None, bool]] = [
    # gateway: sign/verify/jwks on acme keys feedback and tel-*, only from its unit
    (GATEWAY, "sign", "acme/feedback", None, True),
    (GATEWAY, "sign", "acme/tel-eu", None, True),
    (GATEWAY, "verify", "acme/feedback", None, True),
    (GATEWAY, "jwks", "acme/feedback", None, True),
    (GATEWAY, "sign", "acme/billing", None, False),  # key pattern
    (GATEWAY, "sign", "globex/feedback", None, False),  # other tenant
    (GATEWAY, "rotate", "acme/feedback", None, False),  # admin is separate
    (GATEWAY, "create", "acme/feedback", None, False),
    (GATEWAY, "destroy", "acme/feedback", None, False),
    (GATEWAY, "list", "acme/feedback", None, False),
    (GATEWAY, "list", None, None, False),  # cross-tenant listing
    (GATEWAY, "jwks", None, "acme", True),
    (GATEWAY, "jwks", None, "globex", True),  # public-keys rule: anyone, globex
    (GATEWAY_OUTSIDE_UNIT, "sign", "acme/feedback", None, False),  # same uid, no unit
    (GATEWAY_OUTSIDE_UNIT, "jwks", "globex/x", None, True),
    # operators (group users, supplementary): admin and list everywhere, never sign
    (OPERATOR, "create", "acme/feedback", None, True),
    (OPERATOR, "rotate", "globex/other", None, True),
    (OPERATOR, "promote", "acme/feedback", None, True),
    (OPERATOR, "retire", "acme/feedback", None, True),
    (OPERATOR, "destroy", "acme/feedback", None, True),
    (OPERATOR, "list", None, None, True),
    (OPERATOR, "list", None, "globex", True),
    (OPERATOR, "sign", "acme/feedback", None, False),
    # someone else: only the public keys of globex
    (STRANGER, "jwks", "globex/x", None, True),
    (STRANGER, "jwks", None, "globex", True),
    (STRANGER, "jwks", None, None, False),
    (STRANGER, "jwks", "acme/feedback", None, False),
    (STRANGER, "verify", "globex/x", None, False),
    (STRANGER, "sign", "globex/x", None, False),
    (STRANGER, "list", None, "globex", False),
]


@pytest.mark.parametrize(("peer", "op", "key", "tenant", "expected"), CASES)
def test_authorize_matrix(
    policy: Policy, peer: Peer, op: str, key: str | None, tenant: str | None, expected: bool
) -> None:
    """Each (caller, operation, tenant/key) cell is allowed exactly when a rule grants it."""
    assert allowed(policy, call(peer, op, key, tenant)) is expected


def test_denial_says_what_was_refused(policy: Policy) -> None:
    """The 403 message names the operation and the key, nothing else."""
    with pytest.raises(PermissionDenied) as info:
        policy.authorize(call(GATEWAY, "rotate", "acme/feedback"))
    assert info.value.status == 403
    assert info.value.message == "caller may not rotate key acme/feedback"


def test_key_and_tenant_must_agree(policy: Policy) -> None:
    """A call whose tenant differs from its key's tenant is refused (fail closed)."""
    key = KeyName.parse("acme/feedback")
    with pytest.raises(PermissionDenied):
        policy.authorize(Call(GATEWAY, Operation.SIGN, "globex", key))


def test_health_is_always_allowed(policy: Policy) -> None:
    """Health needs no rule, for any caller."""
    for peer in (GATEWAY, OPERATOR, STRANGER):
        policy.authorize(call(peer, "health"))


def test_primary_or_supplementary_group_matches() -> None:
    """A group rule matches a caller whose primary gid or a supplementary gid is in it."""
    policy = policy_from_config(
        {"rules": [{"gids": [100], "tenants": ["acme"], "operations": ["verify"]}]}
    )
    primary = Peer(pid=1, uid=5000, gid=100)
    supplementary = Peer(pid=1, uid=5000, gid=5000, groups=(7, 100))
    neither = Peer(pid=1, uid=5000, gid=5000, groups=(7,))
    assert allowed(policy, call(primary, "verify", "acme/k"))
    assert allowed(policy, call(supplementary, "verify", "acme/k"))
    assert not allowed(policy, call(neither, "verify", "acme/k"))


def test_all_selectors_of_a_rule_must_match() -> None:
    """users and units in one rule: the uid and the unit must both match."""
    policy = policy_from_config(
        {
            "rules": [
                {
                    "uids": [65534],
                    "units": ["gateway@*.service"],
                    "tenants": ["acme"],
                    "operations": ["sign"],
                }
            ]
        }
    )
    inst = Peer(pid=1, uid=65534, gid=65534, unit="gateway@eu.service")
    assert allowed(policy, call(inst, "sign", "acme/k"))
    assert not allowed(policy, call(dataclasses.replace(inst, uid=1), "sign", "acme/k"))
    assert not allowed(
        policy, call(dataclasses.replace(inst, unit="other.service"), "sign", "acme/k")
    )
    assert not allowed(policy, call(dataclasses.replace(inst, unit=None), "sign", "acme/k"))


def test_allowed_tenants_and_visible(policy: Policy) -> None:
    """Listings are filtered: the tenants a caller may list, and each key's visibility."""
    assert policy.allowed_tenants(OPERATOR, Operation.LIST) is None
    assert policy.allowed_tenants(GATEWAY, Operation.LIST) == frozenset()
    assert policy.allowed_tenants(GATEWAY, Operation.JWKS) == frozenset({"acme", "globex"})
    assert policy.allowed_tenants(STRANGER, Operation.JWKS) == frozenset({"globex"})
    assert policy.allowed_tenants(STRANGER, Operation.HEALTH) is None
    assert policy.visible(GATEWAY, Operation.JWKS, KeyName("acme", "feedback"))
    assert not policy.visible(GATEWAY, Operation.JWKS, KeyName("acme", "billing"))
    assert policy.visible(GATEWAY, Operation.JWKS, KeyName("globex", "anything"))
    assert not policy.visible(STRANGER, Operation.JWKS, KeyName("acme", "feedback"))
    assert policy.visible(OPERATOR, Operation.LIST, KeyName("acme", "billing"))
    assert not policy.visible(OPERATOR, Operation.SIGN, KeyName("acme", "billing"))


# --- rate limits --------------------------------------------------------------------


def limited(rate: float, burst: int, name: str = "gw") -> Policy:
    return policy_from_config(
        {
            "rules": [
                {
                    "name": name,
                    "uids": [65534, 1],
                    "tenants": ["acme"],
                    "operations": ["sign"],
                    "rate": rate,
                    "burst": burst,
                }
            ]
        }
    )


def take(policy: Policy, peer: Peer, n: int) -> int:
    """How many of n immediate calls pass."""
    passed = 0
    for _ in range(n):
        try:
            policy.authorize(call(peer, "sign", "acme/k"))
            passed += 1
        except RateLimited as exc:
            assert exc.status == 429
    return passed


def test_rate_limit_is_a_token_bucket() -> None:
    """burst calls pass at once, the next is 429, and tokens come back at `rate` per second."""
    policy = limited(rate=20, burst=3)
    assert take(policy, GATEWAY, 5) == 3
    time.sleep(0.12)  # 2.4 tokens
    assert take(policy, GATEWAY, 5) == 2


def test_rate_limit_is_per_caller_uid_not_pid() -> None:
    """Another uid has its own bucket; another process of the same uid shares it."""
    policy = limited(rate=0.5, burst=2)
    assert take(policy, GATEWAY, 3) == 2
    assert take(policy, dataclasses.replace(GATEWAY, pid=999), 1) == 0
    assert take(policy, OPERATOR, 3) == 2


def test_denied_calls_do_not_use_tokens() -> None:
    """A refused call (403) does not spend its rule's rate (refusals have a bucket of their own)."""
    policy = limited(rate=0.5, burst=2)
    for _ in range(5):
        assert not allowed(policy, call(GATEWAY, "sign", "globex/k"))
    assert take(policy, GATEWAY, 3) == 2


def test_reload_keeps_buckets() -> None:
    """with_state_from carries buckets over for same-named rules, capped at the new burst."""
    old = limited(rate=0.5, burst=5)
    assert take(old, GATEWAY, 3) == 3  # 2 left
    same = limited(rate=0.5, burst=5).with_state_from(old)
    assert take(same, GATEWAY, 5) == 2
    roomy = limited(rate=0.5, burst=5)
    assert take(roomy, GATEWAY, 1) == 1  # 4 left
    smaller = limited(rate=0.5, burst=1).with_state_from(roomy)
    assert take(smaller, GATEWAY, 3) == 1
    renamed = limited(rate=0.5, burst=5, name="other").with_state_from(old)
    assert take(renamed, GATEWAY, 6) == 5  # a new rule starts full


def test_default_burst_is_rate_rounded_up() -> None:
    """Without burst, the bucket holds ceil(rate) tokens."""
    policy = policy_from_config(
        {"rules": [{"uids": [1], "tenants": ["acme"], "operations": ["sign"], "rate": 2.5}]}
    )
    assert policy.rules[0].burst == 3
    assert take(policy, OPERATOR, 5) == 3


# --- refusals of callers some rule matches ---------------------------------------------


def refusals(policy: Policy, peer: Peer, n: int) -> int:
    """How many of n immediate refusals are charged without RateLimited."""
    passed = 0
    for _ in range(n):
        try:
            policy.charge_refusal(peer)
            passed += 1
        except RateLimited as exc:
            assert exc.status == 429 and "refusals/s" in exc.message
    return passed


def test_refusals_have_a_bucket_per_uid() -> None:
    """refusal_burst refusals pass, then 429; per uid (not per unit or rule); refilled at refusal_rate."""
    policy = policy_from_config({**POLICY, "refusal_rate": 20, "refusal_burst": 4})
    assert (policy.refusal_rate, policy.refusal_burst) == (20.0, 4)
    assert refusals(policy, GATEWAY, 6) == 4
    assert refusals(policy, GATEWAY_OUTSIDE_UNIT, 1) == 0  # same uid, another unit
    assert refusals(policy, OPERATOR, 6) == 4
    time.sleep(0.12)  # 2.4 refusals
    assert refusals(policy, GATEWAY, 4) == 2


def test_refusal_defaults() -> None:
    """Without refusal_rate and refusal_burst a policy charges 5 refusals/s after a burst of 60."""
    policy = policy_from_config(POLICY)
    assert (policy.refusal_rate, policy.refusal_burst) == (5.0, 60)
    assert refusals(policy, OPERATOR, 70) == 60


def test_a_grant_is_noted_for_the_request() -> None:
    """authorize sets GRANTED when it lets a call proceed, and leaves it when it refuses."""
    policy = policy_from_config(POLICY)

    def one_request() -> None:  # in a context of its own, as each request's task is
        assert not allowed(policy, call(GATEWAY, "sign", "globex/k"))
        assert not GRANTED.get()
        assert allowed(policy, call(GATEWAY, "jwks", "globex/k"))
        assert GRANTED.get()

    before = GRANTED.get()
    contextvars.Context().run(one_request)
    assert GRANTED.get() == before  # another request's context is untouched


def test_429_records_are_one_per_uid_per_second() -> None:
    """records_limited: true once per uid per second, whichever bucket the 429 came from."""
    policy = policy_from_config(POLICY)
    assert [policy.records_limited(GATEWAY) for _ in range(3)] == [True, False, False]
    assert policy.records_limited(OPERATOR)
    time.sleep(1.05)
    assert [policy.records_limited(GATEWAY_OUTSIDE_UNIT) for _ in range(2)] == [True, False]


def test_reload_keeps_refusal_buckets() -> None:
    """with_state_from carries the refusal bucket over, capped at the new burst."""
    old = policy_from_config({**POLICY, "refusal_rate": 0.5, "refusal_burst": 5})
    assert refusals(old, GATEWAY, 3) == 3
    new = policy_from_config({**POLICY, "refusal_rate": 0.5, "refusal_burst": 5})
    assert refusals(new.with_state_from(old), GATEWAY, 5) == 2


def test_which_callers_a_rule_names() -> None:
    """names_caller: a uid, group or unit a rule names; not users = ["*"] alone; None until the groups or unit that could decide are known."""
    policy = policy_from_config(POLICY)
    bare = Peer(pid=0, uid=65534, gid=65534)  # the gateway's uid: its unit decides
    assert names_caller(policy, bare, groups=False, unit=False) is None
    assert names_caller(policy, GATEWAY, groups=True, unit=True) is True
    assert names_caller(policy, GATEWAY_OUTSIDE_UNIT, groups=True, unit=True) is False
    stranger = Peer(pid=0, uid=4321, gid=4321)  # an operator only through a group
    assert names_caller(policy, stranger, groups=False, unit=False) is None
    assert names_caller(policy, stranger, groups=True, unit=False) is False
    in_group = dataclasses.replace(stranger, groups=(100,))
    assert names_caller(policy, in_group, groups=True, unit=False) is True
    # the public-keys rule (users = ["*"]) grants a stranger jwks but names no one
    assert policy.admits(STRANGER) and not names_caller(policy, STRANGER, groups=True, unit=True)
    uid_only = policy_from_config(
        {"rules": [{"uids": [4321], "tenants": ["*"], "operations": ["jwks"]}]}
    )
    assert names_caller(uid_only, stranger, groups=False, unit=False) is True
    assert names_caller(uid_only, bare, groups=False, unit=False) is False  # decided by uid
    assert names_caller(object(), bare, groups=False, unit=False) is True  # not a policy
