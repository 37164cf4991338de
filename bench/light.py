"""A light load generator for many callers: raw keep-alive sockets, pre-encoded requests,
one epoll loop per process.

Each caller is one connection with one request in flight, as a thread of
``bench.load`` would be, but all of a process's callers share one epoll loop
and send requests encoded before the run: the callers cost a few
microseconds of CPU per request, so the server gets the machine. An answer
counts when it is ``200`` with a ``signature`` in its body; anything else is
an error. The result is a ``bench.load.Run``, like ``drive``'s.
"""

from __future__ import annotations

import json
import multiprocessing
import select
import socket
import threading
import time
import traceback
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .load import CallerResult, Run, collect


@dataclass(frozen=True)
class Requests:
    """What each caller sends, cycling: whole HTTP requests, encoded once."""

    socket: str
    requests: tuple[bytes, ...]


class _Caller:
    __slots__ = ("buf", "busy", "k", "result", "sent", "sock")

    def __init__(self, path: str, result: CallerResult, k: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""
        self.sent = 0
        self.k = k
        self.result = result
        self.busy = False


def _answer(buf: bytes) -> tuple[int, bool] | None:
    """(bytes of a complete answer, whether it is a signature) or None while incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    at = head.find(b"content-length:")
    if at < 0:
        raise ValueError("answer without Content-Length")
    stop = head.find(b"\r\n", at)
    length = int(head[at + 15 : stop if stop > 0 else len(head)])
    total = end + 4 + length
    if len(buf) < total:
        return None
    good = buf[9:12] == b"200" and b'"signature"' in buf[end + 4 : total]
    return total, good


def _loop(callers: list[_Caller], requests: tuple[bytes, ...], until: float, measure: bool) -> None:
    """Run every caller until ``until`` (perf_counter_ns), then finish what is in flight."""
    poll = select.epoll()
    by_fd = {c.sock.fileno(): c for c in callers}
    perf = time.perf_counter_ns
    n = len(requests)
    for fd in by_fd:
        poll.register(fd, select.EPOLLIN)
    for c in callers:
        c.sent = perf()
        c.sock.send(requests[c.k % n])
        c.busy = True
    deadline = until + 30_000_000_000
    busy = len(callers)
    while busy:
        for fd, _ in poll.poll(1.0):
            c = by_fd[fd]
            chunk = c.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed a connection")
            c.buf += chunk
            got = _answer(c.buf)
            if got is None:
                continue
            size, good = got
            c.buf = c.buf[size:]
            now = perf()
            if measure:
                r = c.result
                if good:
                    r.latencies.append(now - c.sent)
                    r.starts.append(c.sent)
                else:
                    r.errors["not a signature"] += 1
                    r.error_times.append(c.sent)
                r.last = now
            c.k += 1
            if now < until:
                c.sent = now
                c.sock.send(requests[c.k % n])
            else:
                c.busy = False
                busy -= 1
        if perf() > deadline:
            raise TimeoutError("answers still missing 30 s after the window")
    poll.close()


def _process(
    target: Requests,
    count: int,
    offset: int,
    warmup: float,
    duration: float,
    barrier: Any,
    queue: Any,
) -> None:
    results = [
        CallerResult(array("q"), array("q"), Counter(), array("q"), [], 0, 0) for _ in range(count)
    ]
    cpu = 0.0
    try:
        callers = [_Caller(target.socket, r, (offset + k) * 7919) for k, r in enumerate(results)]
        _loop(callers, target.requests, time.perf_counter_ns() + int(warmup * 1e9), False)
    except Exception:
        results[0].failure = traceback.format_exc(limit=3)
        barrier.abort()
        queue.put((results, cpu))
        return
    try:
        barrier.wait(timeout=120)
    except threading.BrokenBarrierError:
        results[0].failure = "another caller process failed to start"
        queue.put((results, cpu))
        return
    start, cpu0 = time.perf_counter_ns(), time.process_time()
    for r in results:
        r.first = start
    try:
        _loop(callers, target.requests, start + int(duration * 1e9), True)
    except Exception:
        results[0].failure = traceback.format_exc(limit=3)
    cpu = time.process_time() - cpu0
    for c in callers:
        c.sock.close()
    queue.put((results, cpu))


def drive_light(
    target: Requests,
    callers: int,
    duration: float,
    warmup: float,
    procs: int = 2,
    during: Callable[[int, float], None] | None = None,
) -> Run:
    """``callers`` connections spread over ``procs`` processes, each with one epoll loop.

    ``run.client_cpu`` is the CPU seconds the caller processes spent in the window.
    """
    procs = max(1, min(procs, callers))
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(procs + 1)
    queue = ctx.Queue()
    shares = [callers // procs + (1 if k < callers % procs else 0) for k in range(procs)]
    offsets = [sum(shares[:k]) for k in range(procs)]
    workers = [
        ctx.Process(
            target=_process,
            args=(target, n, offset, warmup, duration, barrier, queue),
            daemon=True,
        )
        for n, offset in zip(shares, offsets, strict=True)
    ]
    for w in workers:
        w.start()
    run = Run(callers, procs, 1, 0, duration)
    try:
        barrier.wait(timeout=warmup + 120)
        run.t0 = time.perf_counter_ns()
        if during is not None:
            during(run.t0, duration)
    except threading.BrokenBarrierError:
        run.failure = "callers failed to start"
    collect(run, queue, workers)
    return run


def sign_requests(path: str, key: str, count: int = 64) -> Requests:
    """``count`` distinct ``POST /v1/sign`` requests for ``key`` (64-byte messages)."""
    from .refs import b64, message

    out = []
    for i in range(count):
        body = json.dumps({"key": key, "data": b64(message(i))}).encode()
        head = (
            "POST /v1/sign HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return Requests(path, tuple(out))
