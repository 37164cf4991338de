"""What the soak measured, checked: errors, memory, descriptors, nonces, the audit trail,
latency; and the PNG of throughput, p99, RSS and descriptors over time.

Windows: the first ``WARMUP`` of the run is warm-up (caches, the first versions, the
allocator reaching its working set). Memory growth compares the median RSS of the first 5
samples after warm-up with the median of the last 5. Latency compares the p99 of the data
requests (signs, verifies, envelopes; not the rare administration calls) started in the
first window after warm-up with those started in the last window of the run; a window is
60 s, or 40% of the run when that is shorter (48 s for a 2-minute run).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .soak import ADMIN, INTENT_OPS, Request, expected
from .soak_watch import Sample

__all__ = ["WARMUP", "Measured", "audit_pairs", "measure", "plot", "verify_trail"]

WARMUP = 0.2  # of the run
_DATA = ("sign", "verify", "verify!", "tsign", "tverify", "fsign", "fverify")


def p99(values: Iterable[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


@dataclass
class Measured:
    """The numbers the soak asserts on (and reports)."""

    seconds: float
    requests: int
    by_what: dict[str, int]
    unexpected: list[Request]
    expected_errors: dict[str, int]
    rss_start_kib: int
    rss_end_kib: int
    rss_growth: float
    fds_start: int
    fds_end: int
    fds_min: int
    fds_max: int
    nonces_max: int
    nonces_unexpired: int
    p99_first: float
    p99_last: float
    worker_sets: int

    def summary(self) -> dict[str, Any]:
        doc = {k: v for k, v in vars(self).items() if k != "unexpected"}
        doc["unexpected"] = [vars(r) for r in self.unexpected[:20]]
        doc["unexpected_count"] = len(self.unexpected)
        return doc


def _median(values: list[int]) -> int:
    return int(statistics.median(values)) if values else 0


def _unexpired(requests: list[Request], samples: list[Sample], ttl: float) -> int:
    """The most live nonces any sample saw beyond what the envelopes accepted in the ``ttl``
    seconds before it (and 3 s of purge interval) could hold: above 0, expired nonces stayed."""
    accepted = [r for r in requests if r.what in ("tverify", "fverify") and r.status == 200]
    worst = -(10**9)
    for s in samples:
        if s.time - samples[0].time < ttl + 3:
            continue
        live = sum(1 for r in accepted if r.start <= s.time and r.end > s.time - ttl - 3)
        worst = max(worst, s.nonces - live)
    return worst


def measure(
    requests: list[Request],
    samples: list[Sample],
    rotating: str,
    start: float,
    end: float,
    nonce_ttl: float,
) -> Measured:
    seconds = end - start
    warm = start + WARMUP * seconds
    window = min(60.0, 0.4 * seconds)
    after = [s for s in samples if warm <= s.time <= end]
    data = [r for r in requests if r.what in _DATA and r.status]
    first = [r.seconds for r in data if warm <= r.start < warm + window]
    last = [r.seconds for r in data if r.start >= end - window]
    errors = [r for r in requests if r.code]
    rss_start = _median([s.rss_kib for s in after[:5]])
    rss_end = _median([s.rss_kib for s in after[-5:]])
    return Measured(
        seconds=round(seconds, 1),
        requests=len(requests),
        by_what=dict(Counter(r.what for r in requests)),
        unexpected=[r for r in errors if not expected(r, rotating)],
        expected_errors=dict(Counter(r.code for r in errors if expected(r, rotating))),
        rss_start_kib=rss_start,
        rss_end_kib=rss_end,
        rss_growth=round((rss_end - rss_start) / rss_start, 4) if rss_start else 0.0,
        fds_start=_median([s.fds for s in after[:5]]),
        fds_end=_median([s.fds for s in after[-5:]]),
        fds_min=min((s.fds for s in after), default=0),
        fds_max=max((s.fds for s in after), default=0),
        nonces_max=max((s.nonces for s in samples), default=0),
        nonces_unexpired=_unexpired(requests, samples, nonce_ttl),
        p99_first=round(p99(first), 4),
        p99_last=round(p99(last), 4),
        worker_sets=len({s.workers for s in samples}),
    )


def audit_records(directory: Path) -> list[dict[str, Any]]:
    """Every record of every trail file in ``directory`` (live and rotated, every worker)."""
    out: list[dict[str, Any]] = []
    for path in sorted(directory.iterdir()):
        if ".jsonl" in path.name and ".anchor" not in path.name:
            out += [json.loads(x) for x in path.read_bytes().splitlines() if x.strip()]
    return out


def audit_pairs(requests: list[Request], records: list[dict[str, Any]]) -> list[str]:
    """Problems matching the trail to what the clients saw: every answered request has
    exactly one outcome record with the status the client got; an admin operation has
    exactly one intent record, and a sign at least one, one of them naming the kid that
    signed (a sign made again with a new version after a rotation elsewhere has one per
    attempt); other requests none. No record names a request no client sent. Requests
    with no answer must have no outcome."""
    by_rid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        by_rid[str(rec.get("request_id"))].append(rec)
    problems: list[str] = []
    sent = set()
    for req in requests:
        sent.add(req.rid)
        got = by_rid.get(req.rid, [])
        intents = [r for r in got if r["outcome"] == "intent"]
        outcomes = [r for r in got if r["outcome"] != "intent"]
        if req.status == 0:
            continue  # no answer: nothing to match (counted as an unexpected error)
        if len(outcomes) != 1:
            problems.append(f"{req.rid} ({req.what}): {len(outcomes)} outcome records")
        elif outcomes[0]["status"] != req.status:
            problems.append(f"{req.rid} ({req.what}): outcome {outcomes[0]['status']}")
        if req.what in INTENT_OPS and req.status == 200:
            problems += _intent_problems(req, intents, outcomes)
        if req.what not in INTENT_OPS and intents:
            problems.append(f"{req.rid} ({req.what}): an intent record")
    stray = sorted(set(by_rid) - sent)
    problems += [f"record of request {rid} no client sent" for rid in stray[:10]]
    return problems


def _intent_problems(
    req: Request, intents: list[dict[str, Any]], outcomes: list[dict[str, Any]]
) -> list[str]:
    if req.what in ADMIN:
        return [] if len(intents) == 1 else [f"{req.rid} ({req.what}): {len(intents)} intents"]
    if not intents:
        return [f"{req.rid} ({req.what}): no intent record"]
    if len(outcomes) == 1 and outcomes[0].get("kid") not in {i.get("kid") for i in intents}:
        return [f"{req.rid} ({req.what}): no intent names the kid that signed"]
    return []


def verify_trail(directory: Path) -> tuple[int, str]:
    """``signerctl audit verify DIR`` (every file there, rotated ones too, with the anchors)."""
    done = subprocess.run(
        [sys.executable, "-m", "signerd.cli", "audit", "verify", str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def plot(
    path: Path,
    requests: list[Request],
    samples: list[Sample],
    start: float,
    events: list[tuple[float, str]],
) -> None:
    """Throughput, p99 of data requests, RSS and open descriptors, one point a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_second: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        per_second[int(r.end - start)].append(r)
    xs = sorted(per_second)
    rate = [len(per_second[x]) for x in xs]
    lat = [1000 * p99(r.seconds for r in per_second[x] if r.what in _DATA) for x in xs]
    st = [s.time - start for s in samples]
    fig, axes = plt.subplots(5, 1, figsize=(10, 12), sharex=True)
    series: list[tuple[list[float], list[float], str]] = [
        ([float(x) for x in xs], [float(v) for v in rate], "requests/s"),
        ([float(x) for x in xs], lat, "p99 of data requests (ms)"),
        (st, [s.rss_kib / 1024 for s in samples], "RSS, all processes (MiB)"),
        (st, [float(s.fds) for s in samples], "open fds, all processes"),
        (st, [float(s.nonces) for s in samples], "live nonces"),
    ]
    for ax, (x, y, label) in zip(axes, series, strict=True):
        ax.plot(x, y, linewidth=0.8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(bottom=0)
        for t, what in events:
            ax.axvline(t - start, color="grey" if "rotation" in what else "orange", lw=0.5)
    axes[-1].set_xlabel("seconds (grey: audit rotation, orange: policy reload)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
