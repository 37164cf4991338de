"""The checker of signerd histories (tests/support/history.py records them).

``check(ops, pubkeys)`` returns every anomaly, each a kind (below) with the operation
and a short detail. Kinds:

- ``bad-signature``: a returned signature (sign, telemetry, feedback) does not verify under
  the public key of the kid returned with it, or that kid's public key was never recorded.
- ``kid-reused``: a kid has two public keys, two kids share one, two rotates returned one kid,
  or a kid does not name its key and version.
- ``version-order``: a rotate returned a version not above one a rotate completed before it.
- ``state-regressed``: a version was seen in a state earlier than one seen before (in real
  time), or a kid seen before is missing from a later listing of its key.
- ``active-count``: a listing of a key with versions has not exactly one active version.
- ``stale-sign``: a sign returned a kid seen verify-only, retired or destroyed before the sign
  was invoked, or seen pending after it completed, or a kid of another key.
- ``stale-verify``: a verify accepted a kid seen retired or destroyed before it was invoked,
  or accepted a signature made over other data.
- ``unexplained-failure``: a failure whose code the history does not explain (see EXPLAINED).
- ``nonce-reused``: an envelope nonce accepted twice, or issued by two signs.
"""

from __future__ import annotations

import base64
import bisect
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.wire import canonical_data, feedback_input, telemetry_input

from .history import STATE_ORDER, Op

__all__ = ["Anomaly", "check"]

PENDING, ACTIVE, VERIFY_ONLY, RETIRED, DESTROYED = range(5)
UNSEEN = -1  # no observation of the version completed before the operation


@dataclass(frozen=True)
class Anomaly:
    kind: str
    op: str
    detail: str


def _b64(text: str) -> bytes:
    """base64url or standard base64, padded or not (the wire uses both)."""
    text = text.rstrip("=").replace("+", "-").replace("/", "_")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _kid_of(kid: str) -> tuple[str, int]:
    """(``TENANT/NAME``, version) of a kid ``TENANT.NAME.vN``."""
    head, _, version = kid.rpartition(".v")
    tenant, _, name = head.partition(".")
    return f"{tenant}/{name}", int(version)


_CHANGES = ("rotate", "promote", "retire", "destroy")


class _Observations:
    """Each kid's states as seen by completed operations: the latest state a kid certainly
    had before a time, and the earliest it certainly had after one."""

    def __init__(self, ops: Iterable[Op]) -> None:
        seen: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
        self.listings: list[tuple[Op, str, dict[str, int]]] = []
        self.made: dict[str, int] = {}  # kid -> invocation of the create or rotate making it
        #: key -> (invocation, completion) of each state change of its versions that took
        self.changes: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lag = 0  # ns a sign may lag another daemon's change (``check``'s ``stale``)
        for op in ops:
            if op.ok and op.f in _CHANGES and op.cmp is not None:
                self.changes[op.args["key"]].append((op.inv, op.cmp))
            if op.ok and op.f == "rotate":
                self.made[op.value["kid"]] = op.inv
            if op.ok and op.f == "create" and op.value.get("versions"):
                self.made[op.value["versions"][0]["kid"]] = op.inv
            versions = op.value.get("versions") if op.ok else None
            if versions is None or op.cmp is None:
                continue
            states = {v["kid"]: STATE_ORDER[v["state"]] for v in versions}
            self.listings.append((op, op.args["key"], states))
            for v in versions:
                seen[v["kid"]].append((op.inv, op.cmp, STATE_ORDER[v["state"]]))
        self.by_end: dict[str, tuple[list[int], list[int]]] = {}
        self.by_start: dict[str, tuple[list[int], list[int], list[int]]] = {}
        for kid, obs in seen.items():
            ends = sorted((c, s) for _, c, s in obs)
            top, prefix = UNSEEN, []
            for _, s in ends:
                top = max(top, s)
                prefix.append(top)
            self.by_end[kid] = ([c for c, _ in ends], prefix)
            starts = sorted((i, s) for i, _, s in obs)
            low, suffix = DESTROYED + 1, [0] * len(starts)
            for n in range(len(starts) - 1, -1, -1):
                low = min(low, starts[n][1])
                suffix[n] = low
            top, upto = UNSEEN, []
            for _, s in starts:
                top = max(top, s)
                upto.append(top)
            self.by_start[kid] = ([i for i, _ in starts], suffix, upto)

    def before(self, kid: str, time: float) -> int:
        """The furthest state ``kid`` was seen in by operations completed before ``time``."""
        ends, prefix = self.by_end.get(kid, ([], []))
        n = bisect.bisect_left(ends, time)
        return prefix[n - 1] if n else UNSEEN

    def after(self, kid: str, time: float) -> int:
        """The earliest state ``kid`` was seen in by operations invoked after ``time``."""
        starts, suffix, _ = self.by_start.get(kid, ([], [], []))
        n = bisect.bisect_right(starts, time)
        return suffix[n] if n < len(suffix) else DESTROYED + 1

    def possible(self, kid: str, op: Op) -> range:
        """The states ``kid`` may have had at some point while ``op`` ran: from the furthest
        seen before it to the furthest seen by any operation invoked before it completed."""
        low = self.before(kid, op.inv)
        starts, _, upto = self.by_start.get(kid, ([], [], []))
        n = bisect.bisect_left(starts, op.end)
        high = max(low, upto[n - 1] if n else UNSEEN)
        return range(max(low, PENDING), high + 1)

    def kids_of(self, key: str) -> list[str]:
        return [kid for kid in self.by_end if _kid_of(kid)[0] == key]


def _verifies(pubkeys: dict[str, set[str]], kid: str, message: bytes, sig: str) -> bool:
    keys = pubkeys.get(kid, set())
    if len(keys) != 1:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(_b64(next(iter(keys)))).verify(_b64(sig), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _signed_message(op: Op) -> bytes | None:
    """What a successful sign-like operation signed (None for other operations)."""
    if op.f == "sign":
        return _b64(op.args["data"])
    if op.f == "tsign":
        v = op.value
        return telemetry_input(str(v["timestamp"]), v["nonce"], _b64(op.args["body"]))
    if op.f == "fsign":
        e = op.value["envelope"]
        data = canonical_data(e["data"])
        return feedback_input(
            e["tenant"], str(e["signed_at"]), e["nonce"], e["schema"], e["kid"], data
        )
    return None


def _transit_refuses(op: Op, obs: _Observations) -> bool:
    """OpenBao/Vault transit destroys from the oldest version up and never above the active
    one (docs/backends.md): whether a lower version (the active one among them, when the
    version is above it) may not have been destroyed yet while ``op`` ran."""
    key, version = op.args["key"], op.args["version"]
    return any(
        _kid_of(kid)[1] < version and any(s != DESTROYED for s in obs.possible(kid, op))
        for kid in obs.kids_of(key)
    )


def _failure_explained(op: Op, obs: _Observations, transit: bool) -> bool:
    """Whether the history explains ``op``'s failure code (EXPLAINED in the docs)."""
    code, key = op.code, str(op.args.get("key"))
    if transit and op.f == "destroy" and code == "invalid_state" and _transit_refuses(op, obs):
        return True
    kid = str(op.args.get("kid") or (op.args.get("envelope") or {}).get("kid"))
    if op.f in ("promote", "retire", "destroy"):
        target = f"{key.replace('/', '.')}.v{op.args['version']}"
        if code == "unknown_version":
            return obs.before(target, op.inv) == UNSEEN
        allowed = {"promote": {PENDING}, "retire": {PENDING, VERIFY_ONLY}, "destroy": {RETIRED}}
        return code == "invalid_state" and any(
            s not in allowed[op.f] for s in obs.possible(target, op)
        )
    if op.f in ("sign", "tsign", "fsign") and code == "invalid_state" and op.cmp is not None:
        # the active version it tried was changed meanwhile, here or (within the lag) through
        # another daemon, and the one retry after a re-read lost the race again
        start = op.inv - obs.lag
        return any(i <= op.cmp and c >= start for i, c in obs.changes.get(key, ()))
    if op.f == "rotate" and code == "invalid_state" and op.args.get("pending"):
        return any(PENDING in obs.possible(k, op) for k in obs.kids_of(key))
    if op.f in ("verify", "tverify", "fverify"):
        if code == "invalid_signature" and not op.args.get("genuine", True):
            return True
        if code in ("retired_kid", "destroyed_kid"):
            floor = RETIRED if code == "retired_kid" else DESTROYED
            return any(s >= floor for s in obs.possible(kid, op))
        if code == "replayed_nonce":
            return bool(op.args.get("replay"))
    return False


def check(
    ops: list[Op], pubkeys: dict[str, set[str]], *, transit: bool = False, stale: float = 0.0
) -> list[Anomaly]:
    """Every anomaly in the history (an empty list: the history is consistent). ``transit``:
    the keys are on OpenBao/Vault transit, whose destroy has an order of its own. ``stale``:
    seconds a sign or verify may lag a change made through another daemon (several daemons
    on one store see each other's changes within ``keys.refresh_interval``)."""
    lag = int(stale * 1e9)
    out: list[Anomaly] = []
    obs = _Observations(ops)
    obs.lag = lag
    owners: dict[str, str] = {}
    for kid, xs in pubkeys.items():
        if len(xs) > 1:
            out.append(Anomaly("kid-reused", kid, "kid has more than one public key"))
        for x in xs:
            if owners.setdefault(x, kid) != kid:
                out.append(Anomaly("kid-reused", kid, f"same public key as {owners[x]}"))
    _check_listings(obs, out)
    _check_rotates(ops, out)
    accepted: dict[str, str] = {}
    issued: dict[str, str] = {}
    for op in ops:
        if op.ok is False:
            if not _failure_explained(op, obs, transit):
                out.append(Anomaly("unexplained-failure", op.id, f"{op.f} failed: {op.code}"))
            continue
        if not op.ok:
            continue
        message = _signed_message(op)
        if message is not None:
            kid = op.value.get("kid") or op.value["envelope"]["kid"]
            sig = op.value.get("sig") or op.value["envelope"]["signature"]
            if not _verifies(pubkeys, kid, message, sig):
                out.append(Anomaly("bad-signature", op.id, f"{op.f} under {kid}"))
            _check_sign_state(op, kid, obs, out, lag)
        nonce = op.value.get("nonce") or (op.value.get("envelope") or {}).get("nonce")
        if op.f in ("tsign", "fsign") and nonce is not None:
            if nonce in issued:
                out.append(Anomaly("nonce-reused", op.id, f"also issued by {issued[nonce]}"))
            issued[nonce] = op.id
        if op.f in ("verify", "tverify", "fverify"):
            _check_verify(op, obs, accepted, out, lag)
    return out


def _check_sign_state(op: Op, kid: str, obs: _Observations, out: list[Anomaly], lag: int) -> None:
    key = op.args["key"]
    if _kid_of(kid)[0] != key:
        out.append(Anomaly("stale-sign", op.id, f"{kid} is not a version of {key}"))
    elif kid not in obs.by_end:
        out.append(Anomaly("stale-sign", op.id, f"{kid} was never listed"))
    elif obs.made.get(kid, 0) > op.end:
        out.append(Anomaly("stale-sign", op.id, f"{kid} was made after the sign"))
    elif obs.before(kid, op.inv - lag) > ACTIVE:
        out.append(Anomaly("stale-sign", op.id, f"{kid} had left active before the sign"))
    elif obs.after(kid, op.end) < ACTIVE:
        out.append(Anomaly("stale-sign", op.id, f"{kid} was still pending after the sign"))


def _check_verify(
    op: Op, obs: _Observations, accepted: dict[str, str], out: list[Anomaly], lag: int
) -> None:
    kid = op.args.get("kid") or op.args["envelope"]["kid"]
    if op.args.get("genuine", True) is False:
        out.append(Anomaly("stale-verify", op.id, "accepted a signature over other data"))
    if obs.before(kid, op.inv - lag) >= RETIRED:
        out.append(Anomaly("stale-verify", op.id, f"accepted {kid} after it was retired"))
    if op.f != "verify":
        nonce = op.args.get("nonce") or op.args["envelope"]["nonce"]
        if nonce in accepted:
            out.append(Anomaly("nonce-reused", op.id, f"also accepted by {accepted[nonce]}"))
        accepted[nonce] = op.id


def _check_listings(obs: _Observations, out: list[Anomaly]) -> None:
    first_seen: dict[str, dict[str, int]] = defaultdict(dict)  # key -> kid -> first completion
    for op, key, states in obs.listings:
        assert op.cmp is not None
        for kid in states:
            if op.cmp < first_seen[key].get(kid, op.cmp + 1):
                first_seen[key][kid] = op.cmp
    for op, key, states in obs.listings:
        for kid, state in states.items():
            if obs.before(kid, op.inv) > state:
                out.append(Anomaly("state-regressed", op.id, f"{kid} went back"))
            if _kid_of(kid)[0] != key:
                out.append(Anomaly("kid-reused", op.id, f"{kid} listed under {key}"))
        for kid, seen in first_seen[key].items():
            if seen < op.inv and kid not in states:
                out.append(Anomaly("state-regressed", op.id, f"{kid} vanished"))
        actives = sum(1 for s in states.values() if s == ACTIVE)
        if states and actives != 1:
            out.append(Anomaly("active-count", op.id, f"{key} listed {actives} active"))


def _check_rotates(ops: list[Op], out: list[Anomaly]) -> None:
    done: dict[str, list[tuple[int, int]]] = defaultdict(list)  # key -> (completion, version)
    kids: dict[str, str] = {}
    for op in ops:
        if op.f == "rotate" and op.ok and op.cmp is not None:
            kid = op.value["kid"]
            if kid in kids:
                out.append(Anomaly("kid-reused", op.id, f"{kid} also returned by {kids[kid]}"))
            kids[kid] = op.id
            done[op.args["key"]].append((op.cmp, _kid_of(kid)[1]))
    for key, rows in done.items():
        rows.sort()
        ends = [c for c, _ in rows]
        top, prefix = 0, []
        for _, v in rows:
            top = max(top, v)
            prefix.append(top)
        for op in ops:
            if op.f == "rotate" and op.ok and op.args["key"] == key:
                n = bisect.bisect_left(ends, op.inv)
                version = _kid_of(op.value["kid"])[1]
                if n and prefix[n - 1] >= version:
                    out.append(
                        Anomaly("version-order", op.id, f"v{version} after v{prefix[n - 1]}")
                    )


def summary(anomalies: list[Anomaly], limit: int = 20) -> str:
    """A short text of the anomalies, for assertion messages."""
    lines = [f"{a.kind} {a.op}: {a.detail}" for a in anomalies[:limit]]
    more = len(anomalies) - limit
    return "\n".join(lines + ([f"... and {more} more"] if more > 0 else []))


def count_by(ops: list[Op]) -> dict[str, Any]:
    """Operations by kind and outcome, for reports: ``{"sign": {"ok": 10, "rate_limited": 1}}``."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for op in ops:
        outcome = "ok" if op.ok else (op.code or "open")
        table[op.f][outcome] += 1
    return {f: dict(v) for f, v in table.items()}
