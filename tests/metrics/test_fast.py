"""The request path's increments written straight into the process's file read back as
prometheus-client's own increments do."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

from signerd.metrics import _fast as fast
from signerd.metrics._recorder import LATENCY_BUCKETS


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())  # type: ignore[no-untyped-call]
    return tmp_path


def _read(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(directory))  # type: ignore[no-untyped-call]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_fast_increments_read_back_as_the_clients_own(files: Path) -> None:
    hist = Histogram("t_seconds", "t", ["way"], buckets=LATENCY_BUCKETS, registry=None)
    count = Counter("t_requests", "t", ["way"], registry=None)
    mine, theirs = fast.histogram(hist.labels("fast")), hist.labels("client")
    mine_count, their_count = fast.counter(count.labels("fast")), count.labels("client")
    assert mine is not hist.labels("fast") and mine_count is not count.labels("fast")
    amounts = [0.0, 0.0001, 0.00011, 0.0025, 0.003, 0.7, 10.0, 11.0, 1e9]
    for amount in amounts * 3:
        mine.observe(amount)
        theirs.observe(amount)
        mine_count.inc()
        their_count.inc()
    mine_count.inc(2.5)
    their_count.inc(2.5)
    samples = _read(files)
    fast_side = {(n, lab): v for (n, lab), v in samples.items() if ("way", "fast") in lab}
    client_side = {
        (n, tuple(("way", "fast") if k == ("way", "client") else k for k in lab)): v
        for (n, lab), v in samples.items()
        if ("way", "client") in lab
    }
    assert fast_side == client_side
    assert fast_side[("t_seconds_count", (("way", "fast"),))] == len(amounts) * 3
    assert fast_side[("t_requests_total", (("way", "fast"),))] == len(amounts) * 3 + 2.5


def test_series_kept_in_the_process_are_returned_as_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(values, "ValueClass", values.MutexValue)
    hist = Histogram("p_seconds", "p", registry=None)
    count = Counter("p_requests", "p", registry=None)
    assert fast.histogram(hist) is hist
    assert fast.counter(count) is count
