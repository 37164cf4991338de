"""signerd with several worker processes (``server.workers`` > 1).

The main process is the supervisor (``signerd.workers.Supervisor``): it binds
the listening socket (or takes systemd's), never loads a backend library,
forks the workers one after another and speaks to systemd for all of them:
``READY=1`` and the ``signerd.ready`` log line once every worker is ready,
``STATUS=``, ``RELOADING=1``/``READY=1`` around SIGHUP, ``STOPPING=1``, and
the watchdog pings from its own loop (a worker whose loop stalls stops its
heartbeats and is killed and replaced while the others serve). Only the
supervisor removes the socket when it stops.

Each worker runs ``Daemon.start`` on the inherited socket with its own
backends (its own token session and login), its own audit file
(``audit.wN.jsonl``) and its own federation state, the rate-limit buckets all
workers share, and the admin lock: create, rotate, promote, retire and
destroy take it (their Idempotency-Keys are looked up and stored under it, in
a file every worker opens: ``_idemstore``), and after each the worker sends
``keyring-changed TENANT/NAME`` so that every other worker re-reads that key
at once. A worker
that cannot start for a configuration reason (a wrong PIN) exits 78 and the
supervisor stops with 78, without a restart loop.

``server.workers = 1`` keeps the single process of ``_daemon.serve`` (no
supervisor): the same code path as before workers existed, one audit file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from .._config import Config, ConfigError, load
from ..errors import BackendUnavailable, SignerdError
from ..keys import KeyService
from ..wire._names import KeyName
from ..workers import (
    AdminLock,
    LockTimeout,
    SharedBuckets,
    SharedConnections,
    Supervisor,
    WorkerChannel,
    runtime_path,
)
from ._main import Daemon, build_policy, exit_code
from ._sockets import bind_unix_socket, unlink_own_socket
from ._systemd import activated_socket, notify, watchdog_interval

__all__ = ["CHANGED", "Worker", "supervise"]

log = logging.getLogger("signerd")

CHANGED = "keyring-changed"  # + " TENANT/NAME", or + " *" for the whole keyring
KEYS = "keys"  # + " N": a worker's key count, for the supervisor only
LEARNED = "learned"  # + " TOKEN": a worker re-read what the notice TOKEN named
ACK_TIMEOUT = 1.0  # seconds an admin operation waits for the other workers to re-read
ADMIN_LOCK_TIMEOUT = 10.0  # seconds an admin operation waits for another worker's
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class Worker:
    """What a worker process adds to its ``Daemon``: its slot, the shared buckets, the admin lock."""

    channel: WorkerChannel
    lock: AdminLock
    connections: SharedConnections | None = None  # open connections per uid, all workers
    keys: KeyService | None = None  # once started: its key count goes to the supervisor
    _seq: int = 0
    _waiting: dict[str, tuple[asyncio.Future[None], list[int]]] = field(default_factory=dict)

    @property
    def index(self) -> int:
        return self.channel.index

    @property
    def buckets(self) -> SharedBuckets | None:
        return self.channel.buckets

    @contextlib.asynccontextmanager
    async def guard(self, key: KeyName) -> AsyncIterator[None]:
        """Hold the admin lock around one admin operation; tell the other workers afterwards.

        The notice goes out whether the operation succeeded or not (a failed
        one may still have changed the token): at worst one needless re-read.
        """
        async with self.locked():
            try:
                yield
            finally:
                await self._announce(key)
                self.report()

    async def _announce(self, key: KeyName) -> None:
        """Tell the other workers; wait (at most ACK_TIMEOUT) until each has re-read the key.

        So the caller's answer leaves only once no worker would still sign
        with, or verify against, what the change replaced.
        """
        self._seq += 1
        token = f"{self.index}.{self._seq}"
        others = max(0, int(self.channel.config.workers) - 1)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (future, [others])
        try:
            if not self.channel.send(f"{CHANGED} {key} {token}") or others == 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(future), ACK_TIMEOUT)
        finally:
            self._waiting.pop(token, None)

    def report(self) -> None:
        """Tell the supervisor how many keys there are (for systemd's STATUS=)."""
        if self.keys is not None:
            self.channel.send(f"{KEYS} {self.keys.key_count}")

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the admin lock (trusted-key changes: every worker re-reads that file by itself)."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.lock.hold(timeout=ADMIN_LOCK_TIMEOUT))
            except LockTimeout as exc:
                log.error("signerd.admin_lock_busy worker=%d", self.index)
                raise BackendUnavailable("another administrative operation is in progress") from exc
            except OSError as exc:  # the runtime directory is not writable
                log.error("signerd.admin_lock_failed worker=%d error=%s", self.index, exc.strerror)
                raise BackendUnavailable("the administrative lock cannot be taken") from exc
            yield

    def on_message(self, keys: KeyService, text: str) -> None:
        """A notice from another worker: re-read what it changed (in the background), then ack."""
        kind, _, rest = text.partition(" ")
        if kind == LEARNED:
            waiting = self._waiting.get(rest)
            if waiting is not None:
                future, left = waiting
                left[0] -= 1
                if left[0] <= 0 and not future.done():
                    future.set_result(None)
            return
        if kind != CHANGED:
            return
        what, _, token = rest.partition(" ")
        if what == "*":
            coro = keys.refresh_all()
        else:
            try:
                key = KeyName.parse(what)
            except SignerdError:
                log.warning("signerd.worker_bad_notice worker=%d", self.index)
                return
            coro = keys.learn(key)
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(lambda t: self._learned(t, token))

    def _learned(self, task: asyncio.Task[None], token: str) -> None:
        _logged(task)
        if token:
            self.channel.send(f"{LEARNED} {token}")


def _logged(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        code = exc.code if isinstance(exc, SignerdError) else type(exc).__name__
        log.warning("signerd.keyring_relearn_failed code=%s", code)


# --- a worker process ------------------------------------------------------------


def worker_main(
    index: int,
    sock: socket.socket,
    channel: WorkerChannel,
    connections: SharedConnections | None = None,
) -> int:
    """The body of worker ``index``: serve ``sock`` until SIGTERM; the exit status."""
    for name in _SYSTEMD_ENV:  # only the supervisor speaks to systemd (NotifyAccess=main)
        os.environ.pop(name, None)
    config: Config = channel.config
    if connections is not None:
        connections.bind(index)
    try:
        asyncio.run(_serve_worker(config, sock, channel, connections))
    except BaseException as exc:
        return exit_code(exc)
    return os.EX_OK


async def _serve_worker(
    config: Config,
    sock: socket.socket,
    channel: WorkerChannel,
    connections: SharedConnections | None,
) -> None:
    started = time.monotonic()
    lock = AdminLock(runtime_path(config.socket, "admin.lock"))
    worker = Worker(channel, lock, connections)
    daemon = await Daemon.start(config, sock, worker)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    channel.on_message(lambda text: worker.on_message(daemon.keys, text))
    channel.heartbeat()
    worker.keys = daemon.keys
    worker.report()
    channel.ready()
    log.info(
        "signerd.worker_serving index=%d pid=%d keys=%d took=%.3f",
        channel.index,
        os.getpid(),
        daemon.keys.key_count,
        time.monotonic() - started,
    )
    try:
        await stop.wait()
    finally:
        log.info("signerd.stopping worker=%d", channel.index)
        channel.close()
        await daemon.stop()
        worker.lock.close()


# --- the supervisor ------------------------------------------------------------


def supervise(config: Config) -> int:
    """Run ``config.workers`` workers on one listening socket; the exit status."""
    started = time.monotonic()
    notify("STATUS=starting: opening the socket and starting the workers")
    sock = activated_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
    activated = sock is not None
    if sock is None:
        sock = bind_unix_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
    state = _SystemdState(config.workers)

    def on_ready() -> None:
        log.info(
            "signerd.ready socket=%s workers=%d took=%.3f activated=%s",
            config.socket,
            config.workers,
            time.monotonic() - started,
            "yes" if activated else "no",
        )
        state.announced = True
        notify("READY=1", state.serving())

    def reload_config(old: Config) -> Config:
        notify("RELOADING=1", "STATUS=reloading the policy", _monotonic_usec())
        try:
            fresh = load(old.path)
            build_policy(fresh)  # the workers build their own; refused here, refused there
        except ConfigError as exc:
            log.error("signerd.reload_refused error=%s", exc)
            state.note = " (reload refused, see the log)"
            notify("READY=1", state.serving())
            raise
        state.note = " (reloaded)"
        notify("READY=1", state.serving())
        return fresh

    connections = SharedConnections(config.workers)  # before any fork: every worker maps it
    supervisor = Supervisor(
        config,
        sock,
        lambda index, listen, channel: worker_main(index, listen, channel, connections),
        reload_config=reload_config,
        on_ready=on_ready,
        on_tick=state.tick,
        on_stop=state.stopping,
        on_message=state.message,
    )
    try:
        code = supervisor.run()
    finally:
        if not activated:
            unlink_own_socket(config.socket, sock)
        sock.close()
    if code == os.EX_CONFIG:
        # the worker's own line (stderr, the journal) says why; no "configuration error" here
        log.error("signerd.workers_failed code=78 retry=no")
        notify("STATUS=failed: configuration error in a worker, see the journal")
    elif code != 0:
        notify(f"STATUS=failed: the workers could not be kept running (exit {code})")
    return code


class _SystemdState:
    """STATUS= text and the watchdog pings of the supervisor."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.note = ""  # the last reload's outcome, kept in STATUS= until the next one
        self.keys: int | None = None  # the key count the workers last reported
        self.announced = False  # READY=1 was sent
        self._every = watchdog_interval()
        self._pinged = 0.0

    def serving(self) -> str:
        keys = "" if self.keys is None else f"{self.keys} keys "
        return f"STATUS=serving {keys}({self.workers} workers){self.note}"

    def message(self, index: int, text: str) -> bool:
        """A worker's key count (kept from the other workers); anything else is theirs."""
        kind, _, value = text.partition(" ")
        if kind != KEYS:
            return False
        if value.isdigit():
            changed = self.keys is not None and self.keys != int(value)
            self.keys = int(value)
            if changed and self.announced:
                notify(self.serving())
        return True

    def tick(self) -> None:
        if self._every is None:
            return
        now = time.monotonic()
        if now - self._pinged >= self._every:
            self._pinged = now
            notify("WATCHDOG=1")

    def stopping(self) -> None:
        log.info("signerd.stopping")
        notify("STOPPING=1", "STATUS=stopping: the workers finish requests in flight")


def _monotonic_usec() -> str:
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
