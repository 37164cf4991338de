"""The pre-fork supervisor: N workers on one inherited listening socket.

In the manner of gunicorn's arbiter: one small, signal-driven loop that knows
nothing of HTTP or keys. It

- forks ``workers`` processes that inherit the listening socket and run
  ``worker_main(index, sock, channel)``, whose return value is the worker's
  exit status;
- starts them one after another: the next fork waits until the previous
  worker reported "initialised" (or "ready") over its pipe (two processes
  initialising a PKCS#11 token at the same instant once saw no token), or
  died; a worker that is not "ready" within ``start_timeout`` is killed;
- restarts a worker that dies: at once if it had been up ``min_uptime``,
  otherwise after a doubling backoff; ``start_limit`` deaths before
  "ready" in a row in one slot (or one with EX_CONFIG) stop everything
  and ``run()`` returns non-zero (a worker that was up is always restarted);
- passes SIGHUP to every worker (a worker still starting gets it once it is
  up) after ``reload_config``; SIGTERM/SIGINT stop all workers with SIGTERM,
  and SIGKILL whatever is left after ``graceful_timeout`` (a second signal
  kills at once);
- calls ``on_ready`` once every worker reported "ready" the first time
  (systemd's READY=1), ``on_tick`` on each turn of its loop (at least once a
  second: systemd's watchdog) and ``on_stop`` when it starts stopping;
  ``on_message(index, text)`` sees each notification first and keeps it
  from the other workers by returning True;
- relays a worker's notification to all the others at once;
- kills (SIGKILL) and replaces a worker whose heartbeats, once begun, stop
  for ``heartbeat_timeout`` seconds: its event loop is stuck;
- makes the kernel send each worker SIGTERM when the supervisor dies
  (``PR_SET_PDEATHSIG``).

The supervisor process must not initialise the backends' libraries itself
(no PKCS#11 session survives a fork) and must not start threads before
``run()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

from ._buckets import SharedBuckets
from ._channel import HEARTBEAT, INITIALISED, MESSAGE, READY, RECV_BUFFER, WorkerChannel, decode
from ._child import STOP_SIGNALS, Child, flush_std, reset_signals, run_child
from ._settings import SupervisedConfig, SupervisorTiming, WorkerMain

__all__ = ["Supervisor", "SupervisorTiming", "WorkerMain"]

log = logging.getLogger("signerd.workers")

_HANDLED = (signal.SIGCHLD, signal.SIGHUP, *STOP_SIGNALS)


class Supervisor:
    """Runs ``worker_main`` in ``workers`` processes until told to stop; see the module text."""

    def __init__(
        self,
        config: SupervisedConfig,
        listen_sock: socket.socket,
        worker_main: WorkerMain,
        workers: int | None = None,
        *,
        timing: SupervisorTiming | None = None,
        buckets: SharedBuckets | None = None,
        reload_config: Callable[[Any], Any] | None = None,
        on_ready: Callable[[], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
        on_message: Callable[[int, str], bool] | None = None,
    ) -> None:
        self.config: Any = config
        self.workers = int(config.workers if workers is None else workers)
        if self.workers < 1:
            raise ValueError("workers: at least 1")
        self.timing = timing or SupervisorTiming()
        # made here, before any fork, so that every worker maps the same pages
        self.buckets = buckets if buckets is not None else SharedBuckets()
        self._listen = listen_sock
        self._main = worker_main
        self._reload_config = reload_config
        self._on_ready = on_ready
        self._on_tick = on_tick
        self._on_stop = on_stop
        self._on_message = on_message
        self._pid = os.getpid()
        self._by_pid: dict[int, Child] = {}
        self._slots: list[Child | None] = [None] * self.workers
        self._due = [0.0] * self.workers  # when an empty slot may start
        self._failures = [0] * self.workers  # deaths within min_uptime in a row (backoff)
        self._failed_starts = [0] * self.workers  # deaths before "ready" in a row
        self._starting: Child | None = None  # initialising its libraries: the next waits
        self._signals: deque[int] = deque()
        self._stopping = False
        self._deadline = 0.0
        self._exit_code = 0
        self._announced = False
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[int, int] | None = None

    # --- the loop ---

    def run(self) -> int:
        """Supervise until stopped; the exit status (0 after a requested stop)."""
        self._selector = selectors.DefaultSelector()
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (rfd, wfd)
        self._selector.register(rfd, selectors.EVENT_READ, None)
        previous = {s: signal.signal(s, self._on_signal) for s in _HANDLED}
        old_wakeup = signal.set_wakeup_fd(wfd)
        log.info("signerd.supervisor_started pid=%d workers=%d", self._pid, self.workers)
        try:
            while not (self._stopping and not self._by_pid):
                self._tick()
            return self._exit_code
        finally:
            self._kill_all()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._selector.close()
            os.close(rfd)
            os.close(wfd)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def _tick(self) -> None:
        assert self._selector is not None and self._wakeup is not None
        for key, _ in self._selector.select(self._timeout()):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wakeup[0], 512):
                        pass
            else:
                self._read(key.data)
        while self._signals:
            signum = self._signals.popleft()
            if signum == signal.SIGHUP:
                self._reload()
            elif signum in STOP_SIGNALS:
                log.info("signerd.supervisor_stopping signal=%s", signal.Signals(signum).name)
                self._stop(0)
        self._reap()
        now = time.monotonic()
        self._kill_stuck(now)
        if self._on_tick is not None:
            try:
                self._on_tick()
            except Exception:
                log.exception("signerd.supervisor_on_tick_failed")
        if self._stopping:
            if now >= self._deadline and self._by_pid:
                log.error("signerd.workers_killed count=%d", len(self._by_pid))
                for pid in list(self._by_pid):
                    self._kill(pid, signal.SIGKILL)
                self._deadline = now + 3600.0  # killed; only reaping is left
            return
        if self._starting is None:
            empty = [i for i, w in enumerate(self._slots) if w is None and self._due[i] <= now]
            if empty:
                self._spawn(min(empty, key=lambda i: self._due[i]))

    def _timeout(self) -> float:
        now = time.monotonic()
        until = [now + min(1.0, self.timing.heartbeat_timeout or 1.0)]
        if self._stopping:
            until.append(self._deadline)
        else:
            deadlines = (w.start_deadline(self.timing.start_timeout) for w in self._by_pid.values())
            until += [d for d in deadlines if d is not None]
            if self._starting is None:
                until += [self._due[i] for i, w in enumerate(self._slots) if w is None]
        return max(0.0, min(until) - now)

    # --- workers ---

    def _spawn(self, index: int) -> None:
        assert self._selector is not None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        flush_std()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later
            mine.close()
            theirs.close()
            self._failures[index] += 1
            self._due[index] = time.monotonic() + self.timing.backoff_max
            log.error("signerd.worker_fork_failed index=%d error=%s", index, exc.strerror)
            if self._failures[index] >= self.timing.start_limit:
                self._stop(1)
            return
        if pid == 0:  # the worker
            mine.close()
            run_child(lambda: self._become_worker(index, theirs))
        theirs.close()
        mine.setblocking(False)
        worker = Child(index, pid, mine, time.monotonic())
        self._by_pid[pid] = worker
        self._slots[index] = worker
        self._starting = worker
        self._selector.register(mine, selectors.EVENT_READ, worker)
        log.info("signerd.worker_started index=%d pid=%d", index, pid)

    def _become_worker(self, index: int, sock: socket.socket) -> int:
        if not reset_signals(self._pid):  # the supervisor died before prctl took effect
            return 1
        assert self._selector is not None and self._wakeup is not None
        self._selector.close()
        for fd in self._wakeup:
            os.close(fd)
        for other in self._by_pid.values():
            other.sock.close()
        self._by_pid.clear()
        channel = WorkerChannel(index, sock, self.config, self.buckets)
        return int(self._main(index, self._listen, channel))

    def _read(self, worker: Child) -> None:
        while True:
            try:
                packet = worker.sock.recv(RECV_BUFFER)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                packet = b""
            if not packet:  # the worker closed its end or died: reaping will tell
                self._forget_pipe(worker)
                return
            if packet == HEARTBEAT:
                worker.beat_at = time.monotonic()
            elif packet == READY:
                self._ready(worker)
            elif packet == INITIALISED:
                self._initialised(worker)
            elif (text := decode(packet)) is not None:
                if not self._consumed(worker, text):
                    self._broadcast(worker, text)
            else:
                log.warning("signerd.worker_bad_packet index=%d pid=%d", worker.index, worker.pid)

    def _initialised(self, worker: Child) -> None:
        if self._starting is worker:  # the next may initialise its libraries
            self._starting = None

    def _ready(self, worker: Child) -> None:
        if worker.ready_at is not None:
            return
        worker.ready_at = time.monotonic()
        if self._starting is worker:
            self._starting = None
        log.info(
            "signerd.worker_ready index=%d pid=%d took=%.3f",
            worker.index,
            worker.pid,
            worker.ready_at - worker.started,
        )
        if worker.reload_pending:
            worker.reload_pending = False
            self._kill(worker.pid, signal.SIGHUP)
        every = all(w is not None and w.ready_at is not None for w in self._slots)
        if every and not self._announced and not self._stopping:
            self._announced = True
            if self._on_ready is not None:
                try:
                    self._on_ready()
                except Exception:
                    log.exception("signerd.supervisor_on_ready_failed")

    def _consumed(self, worker: Child, text: str) -> bool:
        """Whether ``on_message`` kept a notification for the supervisor itself."""
        if self._on_message is None:
            return False
        try:
            return bool(self._on_message(worker.index, text))
        except Exception:
            log.exception("signerd.supervisor_on_message_failed")
            return False

    def _kill_stuck(self, now: float) -> None:
        t = self.timing
        for w in list(self._by_pid.values()):
            if (event := w.overdue(now, t.start_timeout, t.heartbeat_timeout)) is not None:
                log.error("%s", event)
                w.killed = True
                self._kill(w.pid, signal.SIGKILL)

    def _broadcast(self, sender: Child, text: str) -> None:
        packet = MESSAGE + text.encode("ascii")
        for worker in list(self._by_pid.values()):
            if worker is sender or worker.sock.fileno() < 0:
                continue
            try:
                worker.sock.send(packet, socket.MSG_DONTWAIT)
            except OSError:
                log.warning("signerd.worker_notify_dropped index=%d", worker.index)

    def _reload(self) -> None:
        if self._reload_config is not None:
            try:
                self.config = self._reload_config(self.config)
            except Exception as exc:
                log.error("signerd.supervisor_reload_refused error=%s", exc)
        for worker in list(self._by_pid.values()):
            if worker.ready_at is None:
                worker.reload_pending = True
            else:
                self._kill(worker.pid, signal.SIGHUP)
        log.info("signerd.workers_reloading count=%d", len(self._by_pid))

    def _reap(self) -> None:
        for pid in list(self._by_pid):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done == pid:
                self._exited(self._by_pid.pop(pid), os.waitstatus_to_exitcode(status))

    def _exited(self, worker: Child, code: int) -> None:
        self._forget_pipe(worker)
        self._slots[worker.index] = None
        if self._starting is worker:
            self._starting = None
        i = worker.index
        now = time.monotonic()
        if self._stopping:
            log.info("signerd.worker_stopped index=%d pid=%d code=%d", i, worker.pid, code)
            return
        up = worker.ready_at is not None and now - worker.ready_at >= self.timing.min_uptime
        if up:
            self._failures[i] = 0
            self._due[i] = now
        else:
            self._failures[i] += 1
            backoff = self.timing.backoff_initial * 2 ** (self._failures[i] - 1)
            self._due[i] = now + min(self.timing.backoff_max, backoff)
        ready, failures = worker.ready_at is not None, self._failures[i]
        msg = "signerd.worker_exited index=%d pid=%d code=%d ready=%s failures=%d"
        log.warning(msg, i, worker.pid, code, ready, failures)
        self._failed_starts[i] = 0 if ready else self._failed_starts[i] + 1
        failed_code = code if code > 0 else 1
        if worker.ready_at is None and code == os.EX_CONFIG:
            log.error("signerd.worker_configuration_error index=%d", i)
            self._stop(failed_code)
        elif self._failed_starts[i] >= self.timing.start_limit:
            log.error("signerd.worker_start_limit index=%d failures=%d", i, self._failed_starts[i])
            self._stop(failed_code)

    def _forget_pipe(self, worker: Child) -> None:
        if worker.sock.fileno() < 0:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.sock)
        worker.sock.close()

    def _stop(self, code: int) -> None:
        if self._stopping:  # asked again: no more grace
            self._deadline = time.monotonic()
            return
        self._stopping = True
        self._exit_code = code
        if self._on_stop is not None:
            try:
                self._on_stop()
            except Exception:
                log.exception("signerd.supervisor_on_stop_failed")
        self._deadline = time.monotonic() + self.timing.graceful_timeout
        for pid in list(self._by_pid):
            self._kill(pid, signal.SIGTERM)

    def _kill(self, pid: int, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    def _kill_all(self) -> None:
        """Last resort on the way out: nothing of ours is left running."""
        for pid in list(self._by_pid):
            self._kill(pid, signal.SIGKILL)
        for pid, worker in list(self._by_pid.items()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._forget_pipe(worker)
        self._by_pid.clear()
