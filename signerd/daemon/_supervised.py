"""signerd with several worker processes (``server.workers`` > 1).

The main process is the supervisor (``signerd.workers.Supervisor``): it binds
the listening socket (or takes systemd's), never loads a backend library,
forks the workers one after another (the next once the previous is logged in
to its backends) and speaks to systemd for all of them: ``READY=1`` and the
``signerd.ready`` log line once every worker is ready, ``STATUS=``,
``RELOADING=1``/``READY=1`` around SIGHUP, ``STOPPING=1``, and the watchdog
pings from its own loop (a worker whose loop stalls stops its heartbeats and
is killed and replaced while the others serve). Only the supervisor removes
the socket when it stops.

Each worker runs ``Daemon.start`` on the inherited socket with its own
backends (its own token session and login), its own audit file
(``audit.wN.jsonl``) and its own federation state, the rate-limit buckets all
workers share, and the admin lock: create, rotate, promote, retire and destroy
take it (their Idempotency-Keys are looked up and stored under it, in a file
every worker opens: ``_idemstore``), and after each the worker sends
``keyring-changed TENANT/NAME`` so that every other worker re-reads that key
at once. A worker that cannot start for a configuration reason (a wrong PIN)
exits 78 and the supervisor stops with 78, without a restart loop.

``server.workers = 1`` keeps the single process of ``_single.serve`` (no
supervisor), one audit file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from .._config import Config, ConfigError, load
from ..errors import BackendUnavailable, SignerdError
from ..keys import KeyService
from ..metrics import metrics_directory, reset_directory
from ..wire import KeyName
from ..workers import (
    AdminLock,
    LockTimeout,
    SharedBuckets,
    SharedConnections,
    SharedInline,
    StallGuard,
    Supervisor,
    WorkerChannel,
    WorkerTable,
)
from ._assemble import AdminGuard, Daemon, TrustGuard, build_policy, check_reload
from ._forward import ForwarderProcess
from ._loop import run
from ._sockets import bind_unix_socket, unlink_own_socket
from ._systemd import SystemdSession, activated_socket, notify

__all__ = ["CHANGED", "WorkerRole", "supervise"]

ExitCode = Callable[[BaseException], int]  # a failed start's exit status (``_main.exit_code``)

log = logging.getLogger("signerd")

CHANGED = "keyring-changed"  # + " TENANT/NAME", or + " *" for the whole keyring
KEYS = "keys"  # + " N": a worker's key count, for the supervisor only
LEARNED = "learned"  # + " TOKEN": a worker re-read what the notice TOKEN named
ACK_TIMEOUT = 1.0  # seconds an admin operation waits for the other workers to re-read
ADMIN_LOCK_TIMEOUT = 10.0  # seconds an admin operation waits for another worker's
_SYSTEMD_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass
class WorkerRole:
    """One worker's role: its audit file, shared buckets and counts, admin lock, stall guard."""

    channel: WorkerChannel
    lock: AdminLock
    connections: SharedConnections | None = None  # open connections per uid, all workers
    table: WorkerTable | None = None  # the supervisor's; a worker writes its own slot
    inline: SharedInline | None = None  # every worker's token call on its loop
    keys: KeyService | None = None  # once started: its key count goes to the supervisor
    _seq: int = 0
    _waiting: dict[str, tuple[asyncio.Future[None], list[int]]] = field(default_factory=dict)
    owns_socket = False  # the socket is the supervisor's to remove

    @property
    def index(self) -> int:
        return self.channel.index

    @property
    def audit_file(self) -> tuple[int | None, int | None]:
        return self.index, int(self.channel.config.workers)

    @property
    def buckets(self) -> SharedBuckets | None:
        return self.channel.buckets

    @property
    def uid_counter(self) -> SharedConnections | None:
        return self.connections

    @property
    def admin_guard(self) -> AdminGuard:
        return self.guard

    @property
    def worker_table(self) -> WorkerTable:
        if self.table is None:
            self.table = WorkerTable(int(self.channel.config.workers))
        return self.table

    @property
    def trust_guard(self) -> TrustGuard:
        return self.locked

    def stall_guard(
        self, config: Config, last_answers: Callable[[SignerdError], int]
    ) -> StallGuard | None:
        """With ``on_loop``: a worker whose call never returns is replaced (``SharedInline``)."""
        if self.inline is not None:
            self.inline.bind(self.index)
        return StallGuard(last_answers, shared=self.inline) if config.on_loop else None

    def initialised(self) -> None:  # the next worker may start while this one reads its keys
        self.channel.initialised()

    def on_ready(self, keys: KeyService) -> None:
        """Take the other workers' notices, then tell the supervisor this worker serves."""
        self.channel.on_message(lambda text: self.on_message(keys, text))
        self.channel.heartbeat()
        self.keys = keys
        self.report()
        self.channel.ready()

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
    connections: SharedConnections | None,
    exit_code: ExitCode,
    table: WorkerTable | None = None,
    inline: SharedInline | None = None,
) -> int:
    """The body of worker ``index``: serve ``sock`` until SIGTERM; the exit status."""
    for name in _SYSTEMD_ENV:  # only the supervisor speaks to systemd (NotifyAccess=main)
        os.environ.pop(name, None)
    config: Config = channel.config
    if connections is not None:
        connections.bind(index)
    try:
        run(_serve_worker(config, sock, channel, connections, table, inline), config.event_loop)
    except BaseException as exc:
        return exit_code(exc)
    return os.EX_OK


async def _serve_worker(
    config: Config,
    sock: socket.socket,
    channel: WorkerChannel,
    connections: SharedConnections | None,
    table: WorkerTable | None = None,
    inline: SharedInline | None = None,
) -> None:
    started = time.monotonic()
    lock = AdminLock.of_worker(config.socket, channel.index, config.workers)
    role = WorkerRole(channel, lock, connections, table=table, inline=inline)
    daemon = await Daemon.start(config, role, sock)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    daemon.ready()
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
        role.lock.close()


# --- the supervisor ------------------------------------------------------------


def supervise(config: Config, exit_code: ExitCode) -> int:
    """Run ``config.workers`` workers on one listening socket; the exit status.

    ``exit_code`` turns what ended a worker's start into that worker's exit status.
    """
    started = time.monotonic()
    status = _WorkerKeys(config.workers)
    session = SystemdSession(status.serving)
    session.starting("opening the socket and starting the workers")
    sock = activated_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
    activated = sock is not None
    if sock is None:
        sock = bind_unix_socket(config.socket, mode=config.socket_mode, group=config.socket_group)

    def on_ready() -> None:
        log.info(
            "signerd.ready socket=%s workers=%d took=%.3f activated=%s",
            config.socket,
            config.workers,
            time.monotonic() - started,
            "yes" if activated else "no",
        )
        status.announced = True
        session.ready()

    def on_message(index: int, text: str) -> bool:
        return status.message(text, session)

    def reload_config(old: Config) -> Config:
        session.reloading()
        try:
            fresh = load(old.path)
            build_policy(fresh)  # the workers build their own; refused here, refused there
            check_reload(old, fresh)
        except ConfigError as exc:
            log.error("signerd.reload_refused error=%s", exc)
            session.reloaded(False)
            raise
        session.reloaded(True)
        return fresh

    def stopping() -> None:
        log.info("signerd.stopping")
        session.stopping("the workers finish requests in flight")

    connections = SharedConnections(config.workers)  # before any fork: every worker maps it
    table = WorkerTable(config.workers)
    inline = SharedInline(config.workers)
    if config.metrics:
        reset_directory(metrics_directory(config))
    forwarder = ForwarderProcess(config) if config.forwarding is not None else None
    if forwarder is not None:
        forwarder.start()

    def tick() -> None:
        session.tick()
        if forwarder is not None:
            forwarder.poll()

    supervisor = Supervisor(
        config,
        sock,
        lambda index, listen, channel: worker_main(
            index, listen, channel, connections, exit_code, table, inline
        ),
        reload_config=reload_config,
        on_ready=on_ready,
        on_tick=tick,
        on_stop=stopping,
        on_message=on_message,
    )
    try:
        code = supervisor.run()
    finally:
        if forwarder is not None:
            forwarder.stop()
        unlink_own_socket(config.socket, sock)  # only a socket bound here, never systemd's
        sock.close()
    if code == os.EX_CONFIG:
        # the worker's own line (stderr, the journal) says why; no "configuration error" here
        log.error("signerd.workers_failed code=78 retry=no")
        notify("STATUS=failed: configuration error in a worker, see the journal")
    elif code != 0:
        notify(f"STATUS=failed: the workers could not be kept running (exit {code})")
    return code


class _WorkerKeys:
    """The key count the workers last reported, for the supervisor's STATUS= line."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.keys: int | None = None
        self.announced = False  # READY=1 was sent

    def serving(self) -> str:
        keys = "" if self.keys is None else f"{self.keys} keys "
        return f"{keys}({self.workers} workers)"

    def message(self, text: str, session: SystemdSession) -> bool:
        """A worker's key count (kept from the other workers); anything else is theirs."""
        kind, _, value = text.partition(" ")
        if kind != KEYS:
            return False
        if value.isdigit():
            changed = self.keys is not None and self.keys != int(value)
            self.keys = int(value)
            if changed and self.announced:
                session.update()
        return True
