"""The --watch chart's arithmetic: rate and p99 between two expositions, and its bars."""

from __future__ import annotations

import pytest

from signerd.cli._chart import SignChart, quantile, sparkline


def _exposition(count: int, fast: int) -> str:
    """A sign histogram: ``fast`` requests under 1 ms, the rest under 2 ms (two backends)."""
    lines = ["# TYPE signerd_request_duration_seconds histogram"]
    for backend, share in (("hsm", 0.5), ("bao", 0.5)):
        n, f = count * share, fast * share
        for le, c in (("0.001", f), ("0.002", n), ("+Inf", n)):
            lines.append(
                f'signerd_request_duration_seconds_bucket{{backend="{backend}",le="{le}",'
                f'operation="sign"}} {c}'
            )
        lines.append(
            f'signerd_request_duration_seconds_count{{backend="{backend}",operation="sign"}} {n}'
        )
        lines.append(  # another operation's series is not the sign chart's
            f'signerd_request_duration_seconds_count{{backend="{backend}",operation="verify"}} 999'
        )
    return "\n".join(lines) + "\n"


def test_quantile_interpolates_within_its_bucket() -> None:
    """p99 of 50 under 1 ms and 50 under 2 ms is 1.98 ms; all beyond the last bound is it."""
    assert quantile(0.99, [(0.001, 50.0), (0.002, 100.0), (float("inf"), 100.0)]) == pytest.approx(
        0.00198
    )
    assert quantile(0.99, [(0.001, 0.0), (float("inf"), 10.0)]) == 0.001
    assert quantile(0.99, [(0.001, 0.0), (float("inf"), 0.0)]) is None


def test_sparkline_scales_to_the_largest_and_leaves_gaps() -> None:
    """Bars scale to the largest value; a missing value is a blank."""
    assert sparkline([0.0, 1.0, 2.0, None]) == "▁▄█ "
    assert sparkline([0.0, 0.0]) == "▁▁"


def test_rate_and_p99_between_two_frames() -> None:
    """Two frames 2 s apart with 20 more signs (10 fast): 10/s, p99 in the 1-2 ms bucket."""
    chart = SignChart()
    assert chart.points() == []
    chart.add(_exposition(100, 50), 10.0)
    chart.add(_exposition(120, 60), 12.0)
    ((rate, p99),) = chart.points()
    assert rate == pytest.approx(10.0)
    assert p99 == pytest.approx(0.00198)
    lines = chart.render()
    assert lines[0].startswith("sign rate") and lines[0].endswith("10/s")
    assert lines[1].startswith("sign p99") and lines[1].endswith("2.0 ms")
