"""The chart under ``signerctl status --watch``: signing rate and p99 over the last frames.

Each frame reads ``GET /metrics`` (the metrics operation) and keeps the
``signerd_request_duration_seconds`` series of ``sign``, summed over backends;
between two frames the rate is the change of its count over the time between
them, and the p99 is estimated from the change of its buckets as Prometheus's
``histogram_quantile`` does (linear within the bucket). Two sparklines show
the last ``WIDTH`` intervals.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["WIDTH", "SignChart", "quantile", "sparkline"]

WIDTH = 60  # intervals shown
_SERIES = "signerd_request_duration_seconds"
_BARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class _Reading:
    at: float  # seconds, monotonic
    count: float
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), ascending


def _reading(text: str, at: float) -> _Reading:
    count = 0.0
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != _SERIES:
            continue
        for s in family.samples:
            if s.labels.get("operation") != "sign":
                continue
            if s.name == _SERIES + "_count":
                count += s.value
            elif s.name == _SERIES + "_bucket":
                bound = float(s.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + s.value
    return _Reading(at, count, tuple(sorted(buckets.items())))


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` (ascending bounds, the last +Inf)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is all we know
            inside = cumulative - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = bound, cumulative
    return lower


def sparkline(values: list[float | None]) -> str:
    """One bar per value, scaled to the largest; a gap where there is no value."""
    top = max((v for v in values if v is not None), default=0.0)
    out = []
    for v in values:
        if v is None:
            out.append(" ")
        else:
            out.append(
                _BARS[min(len(_BARS) - 1, int(v / top * (len(_BARS) - 1)))] if top else _BARS[0]
            )
    return "".join(out)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


class SignChart:
    """The readings of the last ``WIDTH`` + 1 frames, and their chart."""

    def __init__(self) -> None:
        self._readings: deque[_Reading] = deque(maxlen=WIDTH + 1)

    def add(self, exposition: str, at: float) -> None:
        self._readings.append(_reading(exposition, at))

    def points(self) -> list[tuple[float, float | None]]:
        """(signs per second, p99 seconds or None) of each interval between two readings."""
        out: list[tuple[float, float | None]] = []
        for old, new in itertools.pairwise(self._readings):
            span = new.at - old.at
            count = max(0.0, new.count - old.count)
            before = dict(old.buckets)
            delta = [(b, max(0.0, c - before.get(b, 0.0))) for b, c in new.buckets]
            out.append((count / span if span > 0 else 0.0, quantile(0.99, delta)))
        return out

    def render(self) -> list[str]:
        points = self.points()
        if not points:
            return ["sign rate  (from the next frame on)"]
        rates = [r for r, _ in points]
        p99s = [p for _, p in points]
        return [
            f"sign rate  {sparkline(list(rates)):<{WIDTH}}  {rates[-1]:,.0f}/s",
            f"sign p99   {sparkline(p99s):<{WIDTH}}  {_duration(p99s[-1])}",
        ]
