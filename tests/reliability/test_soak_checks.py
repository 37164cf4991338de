"""The soak's checks, on hand-made request logs, records and samples: each catches its fault."""

from __future__ import annotations

from typing import Any

from ..support.soak import Request, expected
from ..support.soak_checks import audit_pairs, measure
from ..support.soak_watch import Sample

ROT = "t/k0"


def _req(rid: str, what: str, status: int = 200, code: str = "", kid: str = "t.k1.v1") -> Request:
    return Request(rid, what, 1.0, 0.01, status, code, kid)


def _rec(rid: str, outcome: str, status: int = 200, kid: str = "t.k1.v1") -> dict[str, Any]:
    status = 0 if outcome == "intent" else status
    return {"request_id": rid, "outcome": outcome, "status": status, "kid": kid}


def _good() -> tuple[list[Request], list[dict[str, Any]]]:
    reqs = [_req("a", "sign"), _req("b", "verify"), _req("c", "rotate"), _req("d", "tsign")]
    recs = [_rec("a", "intent"), _rec("a", "ok"), _rec("b", "ok"), _rec("c", "intent")]
    return reqs, [*recs, _rec("c", "ok"), _rec("d", "intent"), _rec("d", "ok")]


def test_audit_pairs_accepts_one_intent_and_one_outcome_per_request() -> None:
    """An intent and an outcome per signing request, one outcome per verify: no problem."""
    assert audit_pairs(*_good()) == []


def test_audit_pairs_reports_each_kind_of_mismatch() -> None:
    """Missing intent, extra outcome, wrong status, verify intent, stray record: each reported."""
    reqs, recs = _good()
    assert audit_pairs(reqs, [r for r in recs if r != _rec("a", "intent")]) == [
        "a (sign): no intent record"
    ]
    assert audit_pairs(reqs, [*recs, _rec("d", "ok")]) == ["d (tsign): 2 outcome records"]
    changed = [_rec("b", "ok", 503) if r == _rec("b", "ok") else r for r in recs]
    assert audit_pairs(reqs, changed) == ["b (verify): outcome 503"]
    assert audit_pairs(reqs, [*recs, _rec("b", "intent")]) == ["b (verify): an intent record"]
    assert audit_pairs(reqs, [*recs, _rec("z", "ok")]) == ["record of request z no client sent"]
    assert audit_pairs(reqs, [*recs, _rec("c", "intent")]) == ["c (rotate): 2 intents"]
    other = [_rec("d", "intent", kid="t.k1.v2") if r == _rec("d", "intent") else r for r in recs]
    assert audit_pairs(reqs, other) == ["d (tsign): no intent names the kid that signed"]


def test_audit_pairs_accepts_a_sign_made_again_with_the_new_version() -> None:
    """A sign whose first attempt met a rotation made elsewhere signs again with the new
    version: an intent per attempt, the outcome naming the second's kid."""
    reqs, recs = _good()
    again = [_rec("a", "intent", kid="t.k1.v2") if r == _rec("a", "ok") else r for r in recs]
    assert audit_pairs(reqs, [*again, _rec("a", "ok", kid="t.k1.v2")]) == []


def test_expected_errors_are_only_the_provoked_ones() -> None:
    """Only the provoked refusals are expected: tampered verifies, retired rotating kids."""
    assert expected(_req("a", "verify!", 401, "invalid_signature"), ROT)
    assert expected(_req("a", "tverify", 401, "retired_kid", "t.k0.v3"), ROT)
    assert expected(_req("a", "fverify", 401, "destroyed_kid", "t.k0.v3"), ROT)
    assert not expected(_req("a", "verify", 401, "invalid_signature"), ROT)
    assert not expected(_req("a", "verify", 401, "retired_kid", "t.k1.v1"), ROT)
    assert not expected(_req("a", "sign", 503, "backend_unavailable"), ROT)
    assert not expected(_req("a", "tverify", 401, "stale_timestamp", "t.k0.v3"), ROT)


def _sample(t: float, rss: int, fds: int, nonces: int) -> Sample:
    return Sample(t, rss, fds, nonces, (1, 2))


def test_measure_sees_growth_drift_and_unexpired_nonces() -> None:
    """RSS growth and fd drift after warm-up, and nonces kept past their ttl, are measured."""
    samples = [_sample(float(t), 1000 + 10 * t, 50 + t // 20, 5 * t) for t in range(101)]
    accepted = [Request(f"v{t}", "tverify", float(t), 0.01, 200, "", "t.k1.v1") for t in range(100)]
    m = measure(accepted, samples, ROT, 0.0, 100.0, nonce_ttl=10)
    assert m.rss_start_kib == 1220 and m.rss_end_kib == 1980
    assert m.rss_growth > 0.5
    assert (m.fds_start, m.fds_end) == (51, 54)
    assert m.nonces_unexpired > 0
    steady = [_sample(float(t), 1000, 50, 10) for t in range(101)]
    m = measure(accepted, steady, ROT, 0.0, 100.0, nonce_ttl=10)
    assert (m.rss_growth, m.fds_end - m.fds_start) == (0.0, 0)
    assert m.nonces_unexpired <= 0
