"""signerd in one process (``server.workers = 1``): it serves and speaks to systemd itself.

One audit file, the policy's own rate-limit table, no admin lock and no stall
guard (backend calls run in the executors). The watchdog pings from the event
loop, and every ``STATUS_INTERVAL`` the backends are checked for ``STATUS=``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable

from .._config import Config
from ..errors import SignerdError
from ..keys import KeyService
from ..metrics import metrics_directory, reset_directory
from ..server import UidCounter
from ..workers import SharedBuckets, StallGuard, WorkerTable
from ._assemble import AdminGuard, Daemon, TrustGuard
from ._forward import ForwarderProcess
from ._systemd import SystemdSession, Watchdog, activated_socket, notify

__all__ = ["STATUS_INTERVAL", "Solo", "serve"]

log = logging.getLogger("signerd")

STATUS_INTERVAL = 15.0  # seconds between backend checks for systemd's STATUS= line


class Solo:
    """The role of the only process: it owns its socket and shares nothing."""

    owns_socket = True
    audit_file: tuple[int | None, int | None] = (None, None)
    buckets: SharedBuckets | None = None
    uid_counter: UidCounter | None = None
    admin_guard: AdminGuard | None = None
    trust_guard: TrustGuard | None = None

    _table: WorkerTable | None = None

    @property
    def worker_table(self) -> WorkerTable:
        if self._table is None:
            self._table = WorkerTable(1)
        return self._table

    def stall_guard(
        self, config: Config, last_answers: Callable[[SignerdError], int]
    ) -> StallGuard | None:
        return None

    def initialised(self) -> None:
        pass

    def on_ready(self, keys: KeyService) -> None:
        pass


async def serve(config: Config) -> None:
    started = time.monotonic()
    daemon: Daemon  # STATUS= says serving only once it has started
    session = SystemdSession(lambda: f"{daemon.keys.key_count} keys")
    session.starting("opening the audit trail and logging in to the backends")
    sock = activated_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
    if config.metrics:
        reset_directory(metrics_directory(config))
    forwarder = ForwarderProcess(config) if config.forwarding is not None else None
    if forwarder is not None:
        forwarder.start()
    daemon = await Daemon.start(config, Solo(), sock)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    watchdog = Watchdog(session.watchdog)

    def reload() -> None:
        session.reloading()
        session.reloaded(daemon.reload())

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    daemon.ready()
    log.info(
        "signerd.ready socket=%s keys=%d took=%.3f activated=%s",
        config.socket,
        daemon.keys.key_count,
        time.monotonic() - started,
        "yes" if sock is not None else "no",
    )
    watchdog.start()
    session.ready()
    under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))
    status = loop.create_task(_status_loop(daemon, session)) if under_systemd else None
    keeper = loop.create_task(_keep(forwarder)) if forwarder is not None else None
    try:
        await stop.wait()
    finally:
        session.stopping("finishing requests in flight")
        log.info("signerd.stopping")
        if status is not None:
            status.cancel()
        if keeper is not None:
            keeper.cancel()
        await watchdog.stop()
        await daemon.stop()
        if forwarder is not None:
            await asyncio.to_thread(forwarder.stop)


async def _keep(forwarder: ForwarderProcess) -> None:
    """Start the audit forwarder again when it died."""
    while True:
        await asyncio.sleep(1.0)
        forwarder.poll()


async def _status_loop(
    daemon: Daemon, session: SystemdSession, interval: float = STATUS_INTERVAL
) -> None:
    """Keep systemd's STATUS= current: serving N keys, or which backend check fails."""
    while True:
        await asyncio.sleep(interval)
        try:
            await daemon.keys.ready()
        except SignerdError as exc:
            notify(f"STATUS=backend down: {exc.code} (serving what does not need it)")
        else:
            session.update()
