"""Sign p50 with metrics on and off: two signerd daemons on one SoftHSM token, one with
``[metrics] enabled = false``, measured in turns (off, on, off, on, ...) so that noise
from the rest of the machine falls on both alike; one caller, raw HTTP, as signerd-hsm-seq.

Rows ``signerd-hsm-seq-metrics-off`` and ``signerd-hsm-seq-metrics-on``; the check is
on's p50 within 1.05 x off's.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Protocol

from . import daemon as sd
from .load import drive
from .report import Row, row_from_latencies
from .services import init_token, start_daemon

__all__ = ["PATHS", "ROUNDS", "run"]

ROUNDS = 4  # turns each daemon gets; each is a quarter of the profile's window
PATHS = [
    ("signerd-hsm-seq-metrics-off", "signerd on SoftHSM, one caller, [metrics] enabled = false"),
    ("signerd-hsm-seq-metrics-on", "signerd on SoftHSM, one caller, metrics collected"),
]


class _Profile(Protocol):
    @property
    def warmup(self) -> float: ...

    @property
    def duration(self) -> float: ...


class _Bench(Protocol):
    @property
    def p(self) -> _Profile: ...

    def log(self, text: str) -> None: ...

    def add(self, row: Row, latencies: list[int] | None = None) -> None: ...


def run(bench: _Bench, tmp: Path) -> None:
    """Measure both rows (an error row for each when the set-up fails)."""
    try:
        _measure(bench, tmp)
    except Exception as exc:
        for path, what in PATHS:
            bench.add(Row(path, what, failure=f"{type(exc).__name__}: {exc}"))


def _measure(bench: _Bench, tmp: Path) -> None:
    with ExitStack() as stack:
        token = init_token(tmp, "bench-metrics")
        targets = []
        for (path, _), enabled in zip(PATHS, (False, True), strict=True):
            config, sock = sd.write_config(tmp, path, token.backend_config(), ["bench/m1"])
            config["metrics"] = {"enabled": enabled}
            start_daemon(stack, config, tmp / path)
            targets.append(sd.SignerdSign(sock, "bench/m1"))
        latencies: list[list[int]] = [[], []]
        window = bench.p.duration / ROUNDS
        bench.log(f"metrics on/off: {ROUNDS} turns of {window:.2f} s each, one caller")
        for _ in range(ROUNDS):
            for side, target in enumerate(targets):
                done = drive(target, 1, window, bench.p.warmup)
                if done.failure or sum(done.errors.values()):
                    raise RuntimeError(done.failure or f"errors: {dict(done.errors)}")
                latencies[side] += done.latencies()
        for (path, what), lat in zip(PATHS, latencies, strict=True):
            bench.add(row_from_latencies(path, what, lat), lat)
