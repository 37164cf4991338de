"""A forked worker: the supervisor's record of it, and what it does around ``worker_main``.

Signals back to their defaults (SIGHUP ignored until the worker installs its
own handler), the kernel told to send SIGTERM when the supervisor dies
(``PR_SET_PDEATHSIG``), and a clean exit: logs flushed, ``os._exit`` with the
worker's status, never a return into the supervisor's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

__all__ = [
    "STOP_SIGNALS",
    "Child",
    "flush_std",
    "reset_signals",
    "run_child",
    "set_parent_death_signal",
]

_PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass
class Child:
    """A running worker, as the supervisor knows it."""

    index: int
    pid: int
    sock: socket.socket  # the supervisor's end of the pipe
    started: float
    ready_at: float | None = None
    reload_pending: bool = False
    beat_at: float | None = None  # last heartbeat; None: the worker sends none
    killed: bool = False

    def start_deadline(self, start_timeout: float) -> float | None:
        """When the worker is killed unless "ready" by then; None once ready or killed."""
        return None if self.ready_at is not None or self.killed else self.started + start_timeout

    def overdue(self, now: float, start_timeout: float, heartbeat_timeout: float) -> str | None:
        """Why the worker must be killed now (a log event), or None: not "ready" within
        ``start_timeout``, or its heartbeats stopped for ``heartbeat_timeout`` (0: never)."""
        if self.killed:
            return None
        if (deadline := self.start_deadline(start_timeout)) is not None and now > deadline:
            return f"signerd.worker_start_timeout index={self.index} pid={self.pid}"
        beat, limit = self.beat_at, heartbeat_timeout
        if limit > 0 and beat is not None and now - beat > limit:
            return f"signerd.worker_unresponsive index={self.index} pid={self.pid} silent={now - beat:.1f}"
        return None


def set_parent_death_signal(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends ``signum`` when the parent exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def flush_std() -> None:
    """Flush stdout and stderr (before a fork, so nothing buffered is written twice)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()


def reset_signals(parent_pid: int) -> bool:
    """The supervisor's signal handling undone in the child; False when the supervisor
    died before the parent-death signal took effect."""
    signal.set_wakeup_fd(-1)
    for s in (signal.SIGCHLD, *STOP_SIGNALS):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker installs its own
    set_parent_death_signal(signal.SIGTERM)
    return os.getppid() == parent_pid


def run_child(body: Callable[[], int]) -> NoReturn:
    """Run ``body`` in the forked child and exit with its status (1 if it raised)."""
    code = 1
    try:
        code = body()
    except BaseException:
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            logging.shutdown()
        flush_std()
        os._exit(code)
