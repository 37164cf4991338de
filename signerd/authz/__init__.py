"""Authorization: who is calling (from the kernel), what the call asks, and the policy."""

from ._calls import GRANTED, Call, Gate, Operation, Peer
from ._parse import policy_from_config
from ._peer import kernel_groups, peer_of, unit_from_cgroup
from ._policy import (
    DEFAULT_REFUSAL_BURST,
    DEFAULT_REFUSAL_RATE,
    DEFAULT_UNMATCHED_BURST,
    DEFAULT_UNMATCHED_RATE,
    Policy,
    Rule,
    names_caller,
)

__all__ = [
    "DEFAULT_REFUSAL_BURST",
    "DEFAULT_REFUSAL_RATE",
    "DEFAULT_UNMATCHED_BURST",
    "DEFAULT_UNMATCHED_RATE",
    "GRANTED",
    "Call",
    "Gate",
    "Operation",
    "Peer",
    "Policy",
    "Rule",
    "kernel_groups",
    "names_caller",
    "peer_of",
    "policy_from_config",
    "unit_from_cgroup",
]
