"""Load generation: callers in worker processes, each caller a thread with its own connection.

A *target* is a picklable object whose ``open()`` returns an operation
``op(i) -> object`` that performs one request and raises on failure. ``drive``
spreads the callers over worker processes (started with ``spawn``, so nothing
of the harness's own state, such as an open PKCS#11 library, leaks into
them), lets every caller warm up, lines them all up on one barrier, and then
lets them run for a fixed time, timing each operation with
``time.perf_counter_ns`` (CLOCK_MONOTONIC, comparable across processes).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

Op = Callable[[int], object]


class Target(Protocol):
    def open(self) -> Op: ...


@dataclass
class CallerResult:
    starts: array[int]  # ns, CLOCK_MONOTONIC, one per successful operation
    latencies: array[int]  # ns
    errors: Counter[str]
    error_times: array[int]  # ns, start of each failed operation
    samples: list[object]
    first: int
    last: int
    failure: str | None = None


@dataclass
class Run:
    """Every caller's timings for one measured path."""

    callers: int
    procs: int
    per_op: int  # signatures per operation (batch size, or 1)
    t0: int  # ns, when the measured window opened
    duration: float
    results: list[CallerResult] = field(default_factory=list)
    failure: str | None = None
    client_cpu: float = 0.0  # CPU seconds of the caller processes in the measured window

    def latencies(self, between: tuple[int, int] | None = None) -> list[int]:
        out: list[int] = []
        for r in self.results:
            if between is None:
                out.extend(r.latencies)
            else:
                lo, hi = between
                out.extend(d for s, d in zip(r.starts, r.latencies, strict=True) if lo <= s < hi)
        return out

    @property
    def ops(self) -> int:
        return sum(len(r.latencies) for r in self.results)

    @property
    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for r in self.results:
            total.update(r.errors)
        return total

    @property
    def window(self) -> float:
        starts = [r.first for r in self.results if r.latencies]
        ends = [r.last for r in self.results if r.latencies]
        if not starts:
            return 0.0
        return (max(ends) - min(starts)) / 1e9

    @property
    def throughput(self) -> float:
        """Signatures (or verifications) per second over the measured window."""
        return self.ops * self.per_op / self.window if self.window else 0.0

    def samples(self) -> list[object]:
        return [s for r in self.results for s in r.samples]


def _caller(
    target: Target,
    warmup: float,
    duration: float,
    barrier: Any,
    keep_every: int,
    out: list[CallerResult],
    cpu: list[float],
) -> None:
    result = CallerResult(array("q"), array("q"), Counter(), array("q"), [], 0, 0)
    out.append(result)
    perf = time.perf_counter_ns
    try:
        op = target.open()
        i = 0
        stop = perf() + int(warmup * 1e9)
        while perf() < stop:
            try:
                op(i)
            except Exception as exc:
                result.errors[f"warm-up: {type(exc).__name__}: {str(exc)[:120]}"] += 1
            i += 1
    except Exception:
        result.failure = traceback.format_exc(limit=3)
        barrier.abort()
        return
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        result.failure = result.failure or "another caller failed to start"
        return
    start = perf()
    if not cpu:  # the first caller of this process past the barrier: the window opens
        cpu.append(time.process_time())
    stop = start + int(duration * 1e9)
    result.first = start
    lat, starts, keep = result.latencies, result.starts, result.samples
    n = 0
    while True:
        t = perf()
        if t >= stop:
            break
        try:
            answer = op(i)
        except Exception as exc:
            result.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
            result.error_times.append(t)
            i += 1
            continue
        end = perf()
        lat.append(end - t)
        starts.append(t)
        i += 1
        n += 1
        if keep_every and n % keep_every == 0:
            keep.append(answer)
    result.last = perf()


def _process(
    target: Target,
    threads: int,
    warmup: float,
    duration: float,
    barrier: Any,
    keep_every: int,
    queue: Any,
) -> None:
    out: list[CallerResult] = []
    cpu: list[float] = []
    workers = [
        threading.Thread(
            target=_caller,
            args=(target, warmup, duration, barrier, keep_every, out, cpu),
            daemon=True,
        )
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put((out, time.process_time() - cpu[0] if cpu else 0.0))


def _line_up(barrier: Any, callers: int, workers: list[Any], limit: float) -> None:
    """Wait for every caller at the barrier, giving up early if a worker process died."""
    deadline = time.monotonic() + limit
    while barrier.n_waiting < callers:
        if barrier.broken or any(not w.is_alive() for w in workers) or time.monotonic() > deadline:
            barrier.abort()
            raise threading.BrokenBarrierError
        time.sleep(0.005)
    barrier.wait(timeout=30)


def collect(run: Run, queue: Any, workers: list[Any]) -> None:
    """Gather each caller process's results and CPU seconds into ``run``, then reap the
    processes; the first failure any caller reported becomes the run's."""
    deadline = time.monotonic() + run.duration + 120
    for _ in workers:
        try:
            results, cpu = queue.get(timeout=max(1.0, deadline - time.monotonic()))
        except Exception:
            run.failure = run.failure or "a caller process did not report"
            break
        run.results.extend(results)
        run.client_cpu += cpu
    for w in workers:
        w.join(timeout=10)
        if w.is_alive():
            w.kill()
            w.join()
    for r in run.results:
        if r.failure and not run.failure:
            run.failure = r.failure


def drive(
    target: Target,
    callers: int,
    duration: float,
    warmup: float,
    procs: int = 1,
    per_op: int = 1,
    keep_every: int = 0,
    during: Callable[[int, float], None] | None = None,
) -> Run:
    """Run ``callers`` callers of ``target`` spread over ``procs`` processes.

    ``during(t0, duration)``, when given, runs in this process while the
    callers are measured (for instance, a key rotation every second).
    """
    procs = max(1, min(procs, callers))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(callers + 1)
    queue = ctx.Queue()
    shares = [callers // procs + (1 if k < callers % procs else 0) for k in range(procs)]
    workers = [
        ctx.Process(
            target=_process,
            args=(target, n, warmup, duration, barrier, keep_every, queue),
            daemon=True,
        )
        for n in shares
    ]
    for w in workers:
        w.start()
    run = Run(callers, procs, per_op, 0, duration)
    try:
        _line_up(barrier, callers, workers, warmup + 120)
        run.t0 = time.perf_counter_ns()
        if during is not None:
            during(run.t0, duration)
    except threading.BrokenBarrierError:
        run.failure = "callers failed to start"
    except Exception:
        run.failure = traceback.format_exc(limit=3)
    collect(run, queue, workers)
    return run
