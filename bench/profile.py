"""``python -m bench.profile [--seconds S] [--out DIR]``: where a sign request's CPU goes.

Starts a SoftHSM token and signerd with its default workers, then drives one
caller and 32 callers in turn. During each measured window it reads the CPU
time of every signerd thread from ``/proc`` (reported per signature, by
process and thread name) and, when ``py-spy`` is on the PATH, samples one
worker and lists, per thread, the functions found in the most on-CPU samples.
The in-process references (SoftHSM sign, sign + check, the floor) are timed
the same way, so the table reads as "what signerd adds"; the floor is timed
twice, back to back and with a pause between operations, because a server
that waits for its next request pays more for the same sign and fsync than
a tight loop does. Writes
``profile.txt`` beside the benchmark's results.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from pathlib import Path

from . import daemon as sd
from . import refs
from .load import Target, drive
from .services import REPO, init_token, process_tree, start_daemon

_TICK = os.sysconf("SC_CLK_TCK")
_PAUSE = 0.0003  # about what a one-caller server waits between two requests


def _cpu(root: int) -> dict[tuple[int, int], float]:
    """CPU seconds so far of every thread under ``root``, keyed by (pid, tid)."""
    out: dict[tuple[int, int], float] = {}
    for pid in process_tree(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            out[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


def _machine() -> tuple[float, float]:
    """Busy and total CPU seconds of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / _TICK, sum(fields) / _TICK


def _callers(root: int) -> float:
    """CPU seconds so far of this harness's other children: the load-generating callers."""
    total = 0.0
    daemon = set(process_tree(root))
    for pid in process_tree(os.getpid()):
        if pid == os.getpid() or pid in daemon:
            continue
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "py-spy":
                continue
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


#: frames every sample of a busy thread passes through: counted from the one below them
_ROOTS = {"BaseEventLoop._run_once", "Runner.run", "Thread.run"}  # Runner.run: uvloop


def _read_raw(raw: Path) -> tuple[dict[int, str], list[str]]:
    """py-spy raw samples: the thread names by tid, and per thread the functions found in
    the most samples below the event loop's turn or the thread's run (waiting included:
    a thread's time, not only its CPU)."""
    names: dict[int, str] = {}
    per_thread: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        head = frames[0]  # "thread (TID): NAME"
        tid, _, name = head.removeprefix("thread (").partition("): ")
        if tid.isdigit():
            names[int(tid)] = name or tid
        per_thread[name] += n
        seen = set()
        below = [i for i, f in enumerate(frames) if f.split(" (", 1)[0] in _ROOTS]
        for frame in frames[below[-1] + 1 if below else 1 :]:
            func = frame.split(" (", 1)[0]
            where = frame.rsplit("/", 1)[-1].rstrip(")") if "signerd/" in frame else ""
            key = (name, f"{func} {where}".strip())
            if key not in seen:
                seen.add(key)
                inclusive[key] += n
    lines = []
    for thread, total in per_thread.most_common():
        lines.append(f"    thread {thread}: {total} samples")
        best = sorted(((n, f) for (t, f), n in inclusive.items() if t == thread), reverse=True)
        lines += [f"      {100 * n / total:5.1f}%  {f}" for n, f in best[:16]]
    return names, lines


def _window(root: int, target: Target, callers: int, seconds: float, spy: str | None) -> list[str]:
    tmp = Path(tempfile.mkdtemp(prefix="sdprof-"))
    spent: dict[tuple[int, int], float] = {}
    others: dict[str, float] = {}

    def during(t0: int, duration: float) -> None:
        before, started = _cpu(root), time.monotonic()
        machine, callers_before = _machine(), _callers(root)
        spies = []
        for pid in process_tree(root) if spy is not None else []:
            argv = [str(spy), "record", "-p", str(pid), "-d", str(max(1, int(duration) - 1))]
            argv += ["-r", "100", "-f", "raw", "--threads", "--idle", "--nonblocking"]
            argv += ["-o", str(tmp / str(pid))]
            spies.append(
                subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for proc in spies:
            try:
                proc.wait(timeout=duration + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
        time.sleep(max(0.0, duration - 0.2 - (time.monotonic() - started)))
        after = _cpu(root)
        spent.update({k: v - before.get(k, 0.0) for k, v in after.items()})
        busy, total = (b - a for a, b in zip(machine, _machine(), strict=True))
        others.update(busy=busy, total=total, callers=_callers(root) - callers_before)

    try:
        run = drive(target, callers, seconds, 1.0, procs=2 if callers > 1 else 1, during=during)
        by_pid: dict[int, float] = collections.defaultdict(float)
        for (pid, _), cpu in spent.items():
            by_pid[pid] += cpu
        busiest = max(by_pid, key=lambda p: by_pid[p], default=root)
        raw = tmp / str(busiest)
        names, lines_spy = _read_raw(raw) if raw.exists() else ({}, [])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ops = max(1, run.ops)
    mine = {tid: cpu for (pid, tid), cpu in spent.items() if pid == busiest}
    lines = [
        f"{callers} caller(s): {run.throughput:,.0f} signatures/s, "
        f"{sum(run.errors.values())} errors, {run.failure or 'ok'}",
        f"  signerd CPU per signature, all processes: {1e6 * sum(spent.values()) / ops:,.0f} us; "
        + ", ".join(
            f"{'supervisor' if p == root else 'worker'} {p}: {1e6 * c / ops:,.0f} us"
            for p, c in sorted(by_pid.items())
        ),
        f"  the machine in that window: {100 * others.get('busy', 0) / max(1e-9, others.get('total', 1)):.0f}% busy;"
        f" the callers (load generator) used {1e6 * others.get('callers', 0) / ops:,.0f} us"
        " of CPU per signature",
        f"  the busiest process, {busiest}, by thread (share of its CPU):",
    ]
    for tid, cpu in sorted(mine.items(), key=lambda kv: -kv[1]):
        if cpu > 0:
            share = 100 * cpu / max(1e-9, sum(mine.values()))
            lines.append(f"    {share:5.1f}%  {names.get(tid, tid)}")
    if lines_spy:
        lines.append(f"  py-spy, process {busiest}, wall-clock samples (waiting included):")
        lines += lines_spy
    return lines


def _reference(name: str, target: Target, count: int = 2000, pause: float = 0.0) -> str:
    """Wall and CPU time per operation; with ``pause``, the thread sleeps that long between
    operations (as a server waits for its next request) and only the operations are timed."""
    op = target.open()
    for i in range(200):
        op(i)
    r0, wall = resource.getrusage(resource.RUSAGE_SELF), 0.0
    for i in range(count):
        t0 = time.perf_counter()
        op(i)
        wall += time.perf_counter() - t0
        if pause:
            select.select([], [], [], pause)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return f"    {name}: {1e6 * wall / count:,.0f} us wall, {1e6 * cpu / count:,.0f} us CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="each measured window")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy")
    lines = [f"signerd profile, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs"]
    if spy is None:
        lines.append("(py-spy not found: CPU per thread only)")
    with tempfile.TemporaryDirectory(prefix="sdprof-") as d, ExitStack() as stack:
        tmp = Path(d)
        token = init_token(tmp, "bench-profile")
        lines.append("  in-process references, one thread:")
        floor = refs.SoftHSMFloor
        the_floor = floor(token.module, token.label, token.pin, True, d)
        for name, target, pause in (
            ("sign", floor(token.module, token.label, token.pin, check=False), 0.0),
            ("sign + check", floor(token.module, token.label, token.pin), 0.0),
            ("sign + check + fsync'd line (inproc-floor)", the_floor, 0.0),
            (f"the same, {_PAUSE * 1e6:.0f} us asleep between operations", the_floor, _PAUSE),
        ):
            # a process each: python-pkcs11 logs in once per process
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                lines.append(pool.submit(_reference, name, target, 2000, pause).result(300))
        backend = token.backend_config()
        config, sock = sd.write_config(tmp, "profile", backend, ["bench/k1"])
        daemon = start_daemon(stack, config, tmp / "profile")
        lines.append(f"signerd: {len(process_tree(daemon.pid))} processes")
        for callers in (1, 32):
            lines += _window(
                daemon.pid, sd.SignerdSign(sock, "bench/k1"), callers, args.seconds, spy
            )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
