"""What the supervisor is given: its timings, the configuration it reads, the worker body."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ._channel import WorkerChannel

__all__ = ["SupervisedConfig", "SupervisorTiming", "WorkerMain"]

#: ``worker_main(index, sock, channel)``: a worker's body; its return value is the exit status
WorkerMain = Callable[[int, socket.socket, WorkerChannel], int]


class SupervisedConfig(Protocol):
    @property
    def workers(self) -> int: ...


@dataclass(frozen=True)
class SupervisorTiming:
    start_timeout: float = 120.0  # seconds a worker may take to report "ready"
    graceful_timeout: float = 30.0  # SIGTERM to SIGKILL when stopping
    min_uptime: float = 5.0  # a worker that dies sooner after its start failed to start
    backoff_initial: float = 0.1  # first delay before restarting a failed slot
    backoff_max: float = 10.0
    start_limit: int = 5  # failed starts in a row in one slot before giving up
    heartbeat_timeout: float = 30.0  # a beating worker silent this long is killed (0: never)
