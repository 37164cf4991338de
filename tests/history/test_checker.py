"""The history checker on hand-made histories: clean ones pass, each kind of anomaly is found."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd.wire import telemetry_input

from ..support.history import load, write_lines
from ..support.history_checks import Anomaly, check

KEY = "acme/release"
PRIVATE = {f"acme.release.v{n}": Ed25519PrivateKey.generate() for n in (1, 2, 3)}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _x(kid: str) -> str:
    raw = PRIVATE[kid].public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _b64(raw)


class H:
    """A hand-made history: ``op`` adds an invocation and its completion at given times."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = [
            {"type": "pubkey", "kid": kid, "x": _x(kid)} for kid in PRIVATE
        ]
        self.n = 0

    def op(
        self, f: str, inv: int, cmp: int, args: dict[str, Any], value: Any = None, code: str = ""
    ) -> str:
        self.n += 1
        op_id = f"p:{self.n}"
        self.lines.append(
            {"type": "invoke", "id": op_id, "process": "p", "f": f, "time": inv, "args": args}
        )
        if code:
            self.lines.append({"type": "fail", "id": op_id, "time": cmp, "code": code})
        else:
            self.lines.append({"type": "ok", "id": op_id, "time": cmp, "value": value or {}})
        return op_id

    def listing(self, f: str, inv: int, cmp: int, *states: str, **args: Any) -> str:
        versions = [
            {"version": n, "kid": f"acme.release.v{n}", "state": s} for n, s in enumerate(states, 1)
        ]
        return self.op(f, inv, cmp, {"key": KEY, **args}, {"versions": versions})

    def sign(self, inv: int, cmp: int, kid: str, data: bytes = b"m", signer: str = "") -> str:
        sig = PRIVATE[signer or kid].sign(data)
        return self.op(
            "sign", inv, cmp, {"key": KEY, "data": _b64(data)}, {"kid": kid, "sig": _b64(sig)}
        )

    def tsign(self, inv: int, cmp: int, kid: str, nonce: str) -> dict[str, Any]:
        body = b"{}"
        sig = PRIVATE[kid].sign(telemetry_input("100", nonce, body))
        value = {"kid": kid, "timestamp": 100, "nonce": nonce, "sig": _b64(sig)}
        self.op("tsign", inv, cmp, {"key": KEY, "body": _b64(body)}, value)
        return value

    def anomalies(self, tmp_path: Path) -> list[Anomaly]:
        ops, keys = load([write_lines(tmp_path / "h.jsonl", self.lines)])
        return check(ops, keys)


def _rotated(h: H) -> None:
    """create v1 at 0-10, rotate to v2 at 20-30."""
    h.listing("create", 0, 10, "active")
    h.op(
        "rotate",
        20,
        30,
        {"key": KEY, "pending": False},
        {
            "kid": "acme.release.v2",
            "versions": [
                {"version": 1, "kid": "acme.release.v1", "state": "verify-only"},
                {"version": 2, "kid": "acme.release.v2", "state": "active"},
            ],
        },
    )


def _kinds(found: list[Anomaly]) -> set[str]:
    return {a.kind for a in found}


def test_a_consistent_history_has_no_anomaly(tmp_path: Path) -> None:
    """Signs before, during and after a rotate, envelopes, explained failures: no anomaly."""
    h = H()
    _rotated(h)
    h.sign(12, 18, "acme.release.v1")
    h.sign(15, 35, "acme.release.v1")  # overlaps the rotate: either kid
    h.sign(25, 28, "acme.release.v2")
    h.op("sign", 22, 26, {"key": KEY}, code="invalid_state")  # lost the race to the rotate
    h.sign(40, 50, "acme.release.v2")
    h.listing("retire", 60, 70, "retired", "active", version=1)
    h.op("promote", 65, 66, {"key": KEY, "version": 1}, code="invalid_state")
    h.op("verify", 80, 90, {"kid": "acme.release.v1", "data": "", "sig": ""}, code="retired_kid")
    v = h.tsign(100, 110, "acme.release.v2", "n1")
    args = {"tenant": "acme", "kid": v["kid"], "nonce": "n1", "replay": False}
    h.op("tverify", 120, 130, args, {})
    h.op("tverify", 125, 135, {**args, "replay": True}, code="replayed_nonce")
    assert h.anomalies(tmp_path) == []


@pytest.mark.parametrize(
    ("kind", "build"),
    [
        ("bad-signature", lambda h: h.sign(40, 50, "acme.release.v2", signer="acme.release.v1")),
        ("stale-sign", lambda h: h.sign(40, 50, "acme.release.v1")),
        ("stale-sign", lambda h: h.sign(2, 5, "acme.release.v2")),
        ("active-count", lambda h: h.listing("get", 40, 50, "active", "active")),
        ("state-regressed", lambda h: h.listing("get", 40, 50, "active", "pending")),
        ("state-regressed", lambda h: h.listing("get", 40, 50, "verify-only")),
        ("kid-reused", lambda h: h.op("rotate", 40, 50, {"key": KEY}, {"kid": "acme.release.v2"})),
        (
            "version-order",
            lambda h: h.op("rotate", 40, 50, {"key": KEY}, {"kid": "acme.release.v1"}),
        ),
        (
            "unexplained-failure",
            lambda h: h.op("sign", 40, 50, {"key": KEY}, code="backend_unavailable"),
        ),
        (
            "unexplained-failure",
            lambda h: h.op("sign", 40, 50, {"key": KEY}, code="invalid_state"),
        ),
        (
            "unexplained-failure",
            lambda h: h.op("promote", 40, 50, {"key": KEY, "version": 2}, code="unknown_version"),
        ),
        (
            "unexplained-failure",
            lambda h: h.op("verify", 40, 50, {"kid": "acme.release.v2"}, code="retired_kid"),
        ),
        (
            "stale-verify",
            lambda h: h.op("verify", 40, 50, {"kid": "acme.release.v2", "genuine": False}, {}),
        ),
    ],
)
def test_each_anomaly_is_found(tmp_path: Path, kind: str, build: Any) -> None:
    """Each kind of anomaly, added to a consistent history, is reported as that kind."""
    h = H()
    _rotated(h)
    assert h.anomalies(tmp_path) == []
    build(h)
    assert kind in _kinds(h.anomalies(tmp_path))


def test_a_verify_accepting_a_retired_kid_is_found(tmp_path: Path) -> None:
    """A verify invoked after a retire completed, accepted: stale-verify."""
    h = H()
    _rotated(h)
    h.listing("retire", 40, 50, "retired", "active", version=1)
    h.op("verify", 60, 70, {"kid": "acme.release.v1"}, {"state": "retired"})
    assert _kinds(h.anomalies(tmp_path)) == {"stale-verify"}


def test_a_nonce_accepted_twice_or_issued_twice_is_found(tmp_path: Path) -> None:
    """Two accepted verifies of one nonce, and two signs issuing one nonce: nonce-reused."""
    h = H()
    _rotated(h)
    h.tsign(40, 50, "acme.release.v2", "n1")
    h.tsign(41, 51, "acme.release.v2", "n1")
    args = {"tenant": "acme", "kid": "acme.release.v2", "nonce": "n1"}
    h.op("tverify", 60, 70, args, {})
    h.op("tverify", 80, 90, args, {})
    found = [a for a in h.anomalies(tmp_path) if a.kind == "nonce-reused"]
    assert len(found) == 2, found


def test_a_kid_with_two_public_keys_is_found(tmp_path: Path) -> None:
    """A kid recorded with a second public key (destroyed and made again): kid-reused."""
    h = H()
    _rotated(h)
    h.lines.append({"type": "pubkey", "kid": "acme.release.v1", "x": _x("acme.release.v3")})
    assert "kid-reused" in _kinds(h.anomalies(tmp_path))


def test_a_vanished_kid_is_found(tmp_path: Path) -> None:
    """A listing after the rotate that lacks v1 altogether: state-regressed."""
    h = H()
    _rotated(h)
    h.op(
        "get",
        40,
        50,
        {"key": KEY},
        {"versions": [{"version": 2, "kid": "acme.release.v2", "state": "active"}]},
    )
    assert "state-regressed" in _kinds(h.anomalies(tmp_path))


def test_a_lag_within_the_allowed_staleness_is_not_an_anomaly(tmp_path: Path) -> None:
    """A sign 10 ns after v1 left active: stale-sign without lag, none with a 20 ns lag."""
    h = H()
    _rotated(h)
    h.sign(40, 45, "acme.release.v1")
    ops, keys = load([write_lines(tmp_path / "h.jsonl", h.lines)])
    assert {a.kind for a in check(ops, keys)} == {"stale-sign"}
    assert check(ops, keys, stale=20e-9) == []


def test_transit_destroy_order_explains_invalid_state_only_on_transit(tmp_path: Path) -> None:
    """Destroying v2 while v1 is not destroyed: explained on transit, not on a token."""
    h = H()
    _rotated(h)
    h.listing("get", 40, 50, "verify-only", "verify-only", "active")
    h.listing("retire", 60, 70, "verify-only", "retired", "active", version=2)
    h.op("destroy", 80, 90, {"key": KEY, "version": 2}, code="invalid_state")
    ops, keys = load([write_lines(tmp_path / "h.jsonl", h.lines)])
    assert {a.kind for a in check(ops, keys)} == {"unexplained-failure"}
    assert check(ops, keys, transit=True) == []
