"""The recorder's hooks on the signing path never raise: a series that cannot be written is
counted and logged, and the request goes on."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import values

from signerd.authz import Operation
from signerd.metrics._recorder import Recorder
from signerd.server import AuditNotes


@pytest.fixture(autouse=True)
def _in_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Series kept in this process (a daemon started in this process may have switched
    prometheus-client to its files)."""
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)


def _broken(*_: Any) -> Any:
    raise OSError(28, "No space left on device")


def test_hooks_swallow_a_failed_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """request, batch and audit_written return normally when their series raise."""
    rec = Recorder(lambda tenant: "hsm", ["hsm"])
    monkeypatch.setattr(rec.requests, "labels", _broken)
    monkeypatch.setattr(rec.batch_size, "labels", _broken)
    monkeypatch.setattr(rec.audit_write, "observe", _broken)
    rec.request(AuditNotes(Operation.SIGN, tenant="acme"), "ok", 200, 0.001)
    rec.batch("another", 3, 0.0001, 0.001)
    rec.audit_written(0.002)
    assert rec.failures.total == 3


def test_request_labels_come_from_closed_sets() -> None:
    """A tenant's backend, never the tenant; outcome from the status; code or none."""
    rec = Recorder(lambda tenant: {"globex": "vault"}.get(tenant, "hsm"), ["hsm", "vault"])
    rec.request(AuditNotes(Operation.SIGN, tenant="globex"), "ok", 200, 0.001)
    rec.request(AuditNotes(Operation.SIGN, tenant="acme,globex"), "ok", 200, 0.001)
    rec.request(AuditNotes(Operation.VERIFY, tenant=None), "unknown_kid", 404, 0.001)
    rec.request(AuditNotes(Operation.SIGN, tenant="acme"), "backend_unavailable", 503, 0.001)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in (rec.requests, rec.duration)
        for metric in family.collect()
        for s in metric.samples
        if s.name.endswith(("_total", "_count"))
    }
    assert samples == {
        ("signerd_requests_total", (("code", "none"), ("operation", "sign"), ("outcome", "ok"))): 2,
        (
            "signerd_requests_total",
            (("code", "unknown_kid"), ("operation", "verify"), ("outcome", "refused")),
        ): 1,
        (
            "signerd_requests_total",
            (("code", "backend_unavailable"), ("operation", "sign"), ("outcome", "failed")),
        ): 1,
        (
            "signerd_request_duration_seconds_count",
            (("backend", "vault"), ("operation", "sign")),
        ): 1,
        (
            "signerd_request_duration_seconds_count",
            (("backend", "several"), ("operation", "sign")),
        ): 1,
        (
            "signerd_request_duration_seconds_count",
            (("backend", "none"), ("operation", "verify")),
        ): 1,
        ("signerd_request_duration_seconds_count", (("backend", "hsm"), ("operation", "sign"))): 1,
    }
