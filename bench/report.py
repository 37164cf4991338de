"""Rows, ratios and targets; the printed table, the JSON and the latency chart."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .load import Run

PERCENTILES = (1, 10, 25, 50, 75, 90, 99, 99.9)


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


@dataclass
class Row:
    """One measured path (or one failure to measure it)."""

    path: str
    what: str
    callers: int = 1
    procs: int = 1
    per_op: int = 1  # signatures per request
    ops: int = 0
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    p50_us: float | None = None
    p99_us: float | None = None
    mean_us: float | None = None
    percentiles_us: dict[str, float] = field(default_factory=dict)
    throughput: float | None = None  # signatures (or verifications) per second
    value: float | None = None  # for footprint rows: the measured quantity
    unit: str = ""
    notes: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None

    @property
    def per_sig_us(self) -> float | None:
        return 1e6 / self.throughput if self.throughput else None

    def metric(self, name: str) -> float | None:
        if name == "errors":
            return float(self.errors) if self.failure is None and self.ops else None
        if name.startswith("notes."):
            noted = self.notes.get(name.removeprefix("notes."))
            return float(noted) if isinstance(noted, int | float) else None
        got = getattr(self, name)
        return None if got is None else float(got)

    def measured(self) -> bool:
        if self.failure is not None:
            return False
        if self.unit:
            return bool(self.value and self.value > 0)
        return bool(self.ops and self.p50_us and self.throughput)


def row_from_run(
    path: str, what: str, run: Run, latencies_ns: list[int] | None = None, window: float = 0.0
) -> Row:
    """Summarise a run, or (``latencies_ns``, ``window`` seconds) a slice of it."""
    values = sorted(run.latencies() if latencies_ns is None else latencies_ns)
    errors = run.errors
    row = Row(
        path,
        what,
        callers=run.callers,
        procs=run.procs,
        per_op=run.per_op,
        ops=len(values),
        errors=sum(errors.values()),
        error_kinds=dict(errors.most_common(5)),
        failure=run.failure,
    )
    if values:
        us = [v / 1000 for v in values]
        row.p50_us = percentile(us, 50)
        row.p99_us = percentile(us, 99)
        row.mean_us = sum(us) / len(us)
        row.percentiles_us = {f"p{q:g}": percentile(us, q) for q in PERCENTILES}
        row.percentiles_us["max"] = us[-1]
        if latencies_ns is None:
            row.throughput = run.throughput
        elif window > 0:
            row.throughput = len(values) * run.per_op / window
    elif row.failure is None:
        row.failure = "no operation succeeded" + (f": {next(iter(errors))}" if errors else "")
    return row


def row_from_latencies(path: str, what: str, latencies_ns: list[int]) -> Row:
    """One caller's operations in sequence: throughput is one over the mean latency."""
    values = sorted(latencies_ns)
    row = Row(path, what, ops=len(values))
    if not values:
        row.failure = "no operation succeeded"
        return row
    us = [v / 1000 for v in values]
    row.p50_us = percentile(us, 50)
    row.p99_us = percentile(us, 99)
    row.mean_us = sum(us) / len(us)
    row.percentiles_us = {f"p{q:g}": percentile(us, q) for q in PERCENTILES}
    row.percentiles_us["max"] = us[-1]
    row.throughput = 1e6 / row.mean_us
    return row


@dataclass(frozen=True)
class Check:
    """``path.metric`` against ``ref.ref_metric`` (a ratio) or against a fixed limit."""

    path: str
    metric: str
    ref: str | None
    ref_metric: str
    op: str | None  # "<=", ">=", "<", or None for a ratio given for information
    limit: float | None
    label: str


@dataclass
class Outcome:
    path: str
    label: str
    value: float | None
    ref: str | None
    ref_value: float | None
    ratio: float | None
    op: str | None
    limit: float | None
    status: str  # met, missed, info, error
    detail: str = ""


def evaluate(check: Check, rows: dict[str, Row]) -> Outcome:
    row = rows.get(check.path)
    ref = rows.get(check.ref) if check.ref else None
    out = Outcome(
        check.path, check.label, None, check.ref, None, None, check.op, check.limit, "error"
    )
    if row is None or row.failure or row.metric(check.metric) is None:
        out.detail = f"{check.path} not measured"
        return out
    out.value = row.metric(check.metric)
    compared = out.value
    if check.ref is not None:
        if ref is None or ref.failure or not ref.metric(check.ref_metric):
            out.detail = f"reference {check.ref} not measured"
            return out
        out.ref_value = ref.metric(check.ref_metric)
        assert out.value is not None and out.ref_value
        out.ratio = compared = out.value / out.ref_value
    assert compared is not None
    if check.op is None or check.limit is None:
        out.status = "info"
    elif check.op == "<=":
        out.status = "met" if compared <= check.limit else "missed"
    elif check.op == "<":
        out.status = "met" if compared < check.limit else "missed"
    else:
        out.status = "met" if compared >= check.limit else "missed"
    return out


# --- printing ---


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "us":
        return f"{value / 1000:.2f} ms" if value >= 10_000 else f"{value:.0f} µs"
    if unit == "/s":
        return f"{value:,.0f}/s"
    return f"{value:.3g}{unit}"


def _target_text(o: Outcome) -> str:
    if o.op is None or o.limit is None:
        return f"x {o.ref}" if o.ref else o.label
    what = o.label
    return f"{o.op} {o.limit:g}{'x ' + str(o.ref) if o.ref else ''} ({what})"


def table(rows: list[Row], outcomes: list[Outcome]) -> str:
    by_path: dict[str, list[Outcome]] = {}
    for o in outcomes:
        by_path.setdefault(o.path, []).append(o)
    head = ("path", "callers", "p50", "p99", "throughput", "µs/sig", "ratio", "target", "status")
    lines: list[tuple[str, ...]] = [head]
    for row in rows:
        cells = [row.path, f"{row.callers}" + (f"x{row.per_op}" if row.per_op > 1 else "")]
        if row.failure:
            cells[1] = "-"
            lines.append(
                (*cells, "ERROR", "", "", "", "", row.failure.splitlines()[-1][:70], "error")
            )
            continue
        if row.unit:
            cells[1] = ""
            cells += ["", "", f"{row.value:.3g} {row.unit}", ""]
        else:
            cells += [
                _num(row.p50_us, "us"),
                _num(row.p99_us, "us"),
                _num(row.throughput, "/s"),
                _num(row.per_sig_us),
            ]
        checks = by_path.get(row.path, [])
        if not checks:
            errs = f"{row.errors} errors" if row.errors else ""
            lines.append((*cells, "", errs, "error" if row.errors else ""))
        for k, o in enumerate(checks):
            ratio = f"{o.ratio:.2f}x" if o.ratio is not None else _num(o.value)
            lead = cells if k == 0 else [""] * len(cells)
            lines.append((*lead, ratio, _target_text(o), o.status))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


# --- files ---


def write_json(path: Path, meta: dict[str, Any], rows: list[Row], outcomes: list[Outcome]) -> None:
    doc = {
        "meta": meta,
        "rows": [asdict(r) | {"per_sig_us": r.per_sig_us} for r in rows],
        "checks": [asdict(o) for o in outcomes],
    }
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


CHART_PANELS: tuple[tuple[str, Callable[[Row], bool]], ...] = (
    ("sign, one caller in sequence", lambda r: r.callers == 1 and r.per_op == 1),
    ("sign, concurrent callers", lambda r: r.callers > 1 and r.per_op == 1),
    ("batch requests (whole request)", lambda r: r.per_op > 1),
)


def _tick(value: float, _pos: object) -> str:
    return f"{value / 1000:g} ms" if value >= 1000 else f"{value:g} µs"


Scaling = dict[str, dict[int, float]]  # series -> callers -> signatures per second


def write_chart(
    path: Path,
    rows: list[Row],
    latencies: dict[str, list[int]],
    title: str,
    scaling: Scaling | None = None,
) -> None:
    """Latency CDFs on a log axis, one panel per kind of path, and throughput against callers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, grid = plt.subplots(2, 2, figsize=(16, 12))
    axes = list(grid.flat)
    for ax, (name, wanted) in zip(axes, CHART_PANELS, strict=False):
        shown = [
            r for r in rows if not r.unit and not r.failure and wanted(r) and latencies.get(r.path)
        ]
        for r in shown:
            values = sorted(latencies[r.path])
            step = max(1, len(values) // 4000)
            xs = [v / 1000 for v in values[::step]] + [values[-1] / 1000]
            ys = [i * step / len(values) for i in range(len(xs) - 1)] + [1.0]
            ax.plot(xs, ys, label=f"{r.path} (p50 {_num(r.p50_us, 'us')})", linewidth=1.6)
        ax.set_xscale("log")
        if shown:
            lo = min(min(latencies[r.path]) for r in shown)
            hi = max(max(latencies[r.path]) for r in shown)
            wide = hi > 300 * lo  # more than ~2.5 decades: label the decades only
            subs = (1.0,) if wide else (1.0, 2.0, 5.0)
            ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(_tick))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name)
        ax.set_xlabel("latency per request (log scale)")
        ax.set_ylabel("fraction of requests at or below")
        ax.axhline(0.5, color="grey", linewidth=0.5, linestyle=":")
        ax.axhline(0.99, color="grey", linewidth=0.5, linestyle=":")
        ax.grid(True, which="both", alpha=0.25)
        if shown:
            ax.legend(fontsize=8, loc="lower right")
    _scaling_panel(axes[3], rows, scaling or {})
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _scaling_panel(ax: Any, rows: list[Row], scaling: Scaling) -> None:
    """Signatures per second against concurrent callers (1 to 64), with the in-process floors."""
    from matplotlib.ticker import FixedLocator, ScalarFormatter

    ticks: set[int] = set()
    for series, points in sorted(scaling.items()):
        if not points:
            continue
        xs = sorted(points)
        ticks.update(xs)
        ax.plot(xs, [points[x] for x in xs], marker="o", linewidth=1.6, label=series)
    by_path = {r.path: r for r in rows}
    for ref, style in (("inproc-softhsm", "--"), ("inproc-floor", ":")):
        r = by_path.get(ref)
        if r is not None and r.throughput and not r.failure:
            ax.axhline(
                r.throughput,
                color="grey",
                linestyle=style,
                linewidth=1.2,
                label=f"{ref}, one thread ({r.throughput:,.0f}/s)",
            )
    ax.set_xscale("log", base=2)
    if ticks:
        ax.xaxis.set_major_locator(FixedLocator(sorted(ticks)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    top = max([v for points in scaling.values() for v in points.values()] or [1.0])
    floors = [by_path[r].throughput or 0.0 for r in ("inproc-softhsm",) if r in by_path]
    ax.set_ylim(0, 1.3 * max([top, *floors]))  # room for the legend above the lines
    ax.set_title("throughput against concurrent callers")
    ax.set_xlabel("callers (log scale)")
    ax.set_ylabel("signatures per second")
    ax.grid(True, which="both", alpha=0.25)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left")
