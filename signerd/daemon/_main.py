"""The ``signerd`` process: configuration, backends, socket, signals.

    signerd --config /etc/signerd/signerd.toml [--check]

SIGTERM/SIGINT stop it gracefully (in-flight requests finish). SIGHUP reloads
the policy from the configuration file (an invalid policy is refused and the
old one kept) and reopens the audit file (log rotation), without dropping
connections. Under systemd (see ``_systemd``) it takes the activated socket,
tells systemd STATUS=, READY=1, RELOADING=1 and STOPPING=1, pings the watchdog
from the event loop and logs to the journal. Configuration errors, including
credentials the backend refuses at start (a wrong PIN), exit 78 (EX_CONFIG).

With ``server.workers`` > 1 this process is the supervisor of that many
worker processes, each running ``Daemon.start`` on the shared socket (see
``_workerd``); with 1 it serves in this process (``serve``), as it always did.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._config import Config, ConfigError, load
from ..audit._trail import AuditTrail, audit_from_config
from ..authz._peer import peer_of
from ..authz._policy import Policy, policy_from_config
from ..backends import Backend, load_factory
from ..errors import SignerdError
from ..federation import Federation, attach
from ..keys._service import KeyService
from ..server import IdempotencyStore, Limits, Server, connection_cap, raise_nofile_limit
from ..workers import StallGuard, runtime_path
from ._sockets import SocketError, bind_unix_socket, unlink_own_socket
from ._systemd import (
    ActivationError,
    Watchdog,
    activated_socket,
    notify,
    setup_logging,
    watchdog_interval,
)

if TYPE_CHECKING:
    from ..workers import SharedBuckets
    from ._supervised import Worker

log = logging.getLogger("signerd")

STATUS_INTERVAL = 15.0  # seconds between backend checks for systemd's STATUS= line


def build_backends(config: Config) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, table in config.backends.items():
        factory = load_factory(str(table["type"]))
        try:
            backends[name] = factory(table)
        except ValueError as exc:
            raise ConfigError(f"backends.{name}.{exc}") from exc
    return backends


def build_policy(config: Config, buckets: SharedBuckets | None = None) -> Policy:
    try:
        return policy_from_config(config.policy, buckets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def build_audit(config: Config, worker: int | None = None) -> AuditTrail:
    """The audit trail; a worker's own file (``audit.wN.jsonl``) when ``worker`` is given."""
    os.makedirs(os.path.dirname(str(config.audit["path"])), mode=0o750, exist_ok=True)
    try:
        return audit_from_config(
            config.audit, worker=worker, workers=None if worker is None else config.workers
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _fitted(config: Config) -> Limits:
    """The configured limits, with the connection cap fitted to the descriptors there are.

    The soft RLIMIT_NOFILE is raised to the hard limit first; the cap keeps
    headroom for the token, the audit file and the executors.
    """
    nofile = raise_nofile_limit()
    cap = connection_cap(config.limits.max_connections, nofile)
    if cap < config.limits.max_connections:
        log.warning(
            "signerd.max_connections_lowered configured=%d now=%d nofile=%d",
            config.limits.max_connections,
            cap,
            nofile,
        )
    return dataclasses.replace(config.limits, max_connections=cap)


@dataclass
class Daemon:
    """A running signerd: the key service, the server and the listening socket."""

    config: Config
    keys: KeyService
    server: Server
    sock: socket.socket
    worker: Worker | None = None
    guard: StallGuard | None = None
    federation: Federation | None = None

    @classmethod
    async def start(
        cls, config: Config, sock: socket.socket | None = None, worker: Worker | None = None
    ) -> Daemon:
        """Start serving on ``sock`` (the activated socket), or on one bound here when None.

        A ``worker`` (one of several processes under the supervisor) serves the
        supervisor's socket, never unlinks it, writes its own audit file, shares
        the rate-limit table and takes the cross-process admin lock.
        """
        index = None if worker is None else worker.index
        policy = build_policy(config, None if worker is None else worker.buckets)
        audit = build_audit(config, index)
        audit.open()  # anchored at start: every chain of the run has an anchor of it
        keys = KeyService(
            build_backends(config),
            default_backend=config.default_backend,
            tenant_backends=config.tenant_backends,
            settings=config.settings,
        )
        if worker is not None:
            keys.admin_guard = worker.guard
        try:
            await keys.start(config.bootstrap)
        except BaseException:
            await keys.close()
            await audit.aclose()
            raise
        limits = _fitted(config)
        server = Server(keys, gate=policy, audit=audit, peer_lookup=peer_of, limits=limits)
        server.idempotency = IdempotencyStore(  # shared by the workers, in the runtime directory
            runtime_path(config.socket, "idempotency.db"),
            ttl=config.settings.idempotency_ttl,
            max_entries=config.settings.idempotency_max_entries,
        )
        federation = Federation.from_settings(
            server, config.federation, max_body_bytes=config.limits.max_body_bytes
        )
        if worker is not None:
            federation.admin_guard = worker.locked
        attach(server, federation)
        if sock is None:
            sock = bind_unix_socket(
                config.socket, mode=config.socket_mode, group=config.socket_group
            )
        listener = await server.serve(sock)  # accepts on sock as it is: listen(SOMAXCONN) stays
        guard = None
        if worker is not None:  # set before this loop turns again, so before any accept
            listener.shared_uids = worker.connections
            if config.on_loop:  # the supervisor replaces a worker whose call never returns
                guard = keys.stall_guard = audit.stall_guard = StallGuard(listener.last_answers)
        return cls(config, keys, server, sock, worker, guard, federation)

    def reload(self) -> None:
        """SIGHUP: new policy from the file (kept only when valid) and reopen the audit file."""
        try:
            fresh = load(self.config.path)
            policy = build_policy(fresh, None if self.worker is None else self.worker.buckets)
        except ConfigError as exc:
            log.error("signerd.reload_refused error=%s", exc)
        else:
            old = self.server.gate
            if isinstance(old, Policy):
                policy = policy.with_state_from(old)
            self.server.gate = policy
            log.info("signerd.policy_reloaded")
        audit = self.server.audit
        if isinstance(audit, AuditTrail):
            audit.reopen()

    async def stop(self) -> None:
        await self.server.close()
        if self.worker is None:  # a worker's socket is the supervisor's to remove
            unlink_own_socket(self.config.socket, self.sock)
        self.sock.close()
        await self.keys.close()
        federation = self.federation
        if federation is not None:
            await federation.close()
        audit = self.server.audit
        if isinstance(audit, AuditTrail):
            await audit.aclose()
        if self.guard is not None:
            self.guard.close()


def _notify(*lines: str) -> None:
    """sd_notify lines to $NOTIFY_SOCKET (nothing without systemd)."""
    notify(*lines)


async def serve(config: Config) -> None:
    started = time.monotonic()
    _notify("STATUS=starting: opening the audit trail and logging in to the backends")
    sock = activated_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
    daemon = await Daemon.start(config, sock)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    watchdog = Watchdog(watchdog_interval())

    note = ""  # the last reload's outcome, kept in STATUS= until the next one

    def serving() -> str:
        return f"STATUS=serving {daemon.keys.key_count} keys{note}"

    def reload() -> None:
        nonlocal note
        _notify("RELOADING=1", "STATUS=reloading the policy", _monotonic_usec())
        before = daemon.server.gate
        daemon.reload()
        applied = daemon.server.gate is not before
        note = " (reloaded)" if applied else " (reload refused, see the log)"
        _notify("READY=1", serving())

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info(
        "signerd.ready socket=%s keys=%d took=%.3f activated=%s",
        config.socket,
        daemon.keys.key_count,
        time.monotonic() - started,
        "yes" if sock is not None else "no",
    )
    watchdog.start()
    _notify("READY=1", serving())
    under_systemd = bool(os.environ.get("NOTIFY_SOCKET"))
    status = loop.create_task(_status_loop(daemon, serving)) if under_systemd else None
    try:
        await stop.wait()
    finally:
        _notify("STOPPING=1", "STATUS=stopping: finishing requests in flight")
        log.info("signerd.stopping")
        if status is not None:
            status.cancel()
        await watchdog.stop()
        await daemon.stop()


async def _status_loop(
    daemon: Daemon, serving: Callable[[], str], interval: float = STATUS_INTERVAL
) -> None:
    """Keep systemd's STATUS= current: serving N keys, or which backend check fails."""
    while True:
        await asyncio.sleep(interval)
        try:
            await daemon.keys.ready()
        except SignerdError as exc:
            _notify(f"STATUS=backend down: {exc.code} (serving what does not need it)")
        else:
            _notify(serving())


def _monotonic_usec() -> str:
    """MONOTONIC_USEC= for RELOADING=1 (systemd 253+ matches it to the reload; older ignore it)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def _credentials_refused(exc: BaseException) -> str | None:
    """Why a start-up failure is the configuration's fault (a refused PIN/token), or None."""
    refused: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError)
    try:
        import pkcs11.exceptions as p11e

        refused += (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange, p11e.PinLocked)
        refused += (p11e.PinExpired, p11e.NoSuchToken)
    except ImportError:
        pass
    try:
        import hvac.exceptions as hve

        refused += (hve.Forbidden, hve.Unauthorized)
    except ImportError:
        pass
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, refused):
            return type(cause).__name__
        cause = cause.__cause__
    return None


def _fail(line: str) -> None:
    """The one line saying why signerd did not start: stderr (the journal) and STATUS=."""
    print(f"signerd: {line}", file=sys.stderr, flush=True)
    _notify(f"STATUS=failed: {line}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="signerd", description="Ed25519 signing daemon")
    parser.add_argument(
        "--config", "-c", default=os.environ.get("SIGNERD_CONFIG", "/etc/signerd/signerd.toml")
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        config = load(args.config)
        if args.check:
            build_policy(config)
            build_audit(config)
            for table in config.backends.values():
                load_factory(str(table["type"]))
            print(f"signerd: {args.config}: ok")
            return os.EX_OK
        setup_logging(config.log_level)
        if config.workers > 1:
            from ._supervised import supervise

            return supervise(config)
        asyncio.run(serve(config))
    except BaseException as exc:
        return exit_code(exc)
    return os.EX_OK


def exit_code(exc: BaseException) -> int:
    """The exit status for an exception that ended start-up (re-raised when it is not ours)."""
    if isinstance(exc, ConfigError | ActivationError):
        _fail(f"configuration error: {exc}")
        return os.EX_CONFIG
    if isinstance(exc, SocketError):
        _fail(f"cannot listen: {exc}")
        return os.EX_CANTCREAT
    if isinstance(exc, SignerdError):
        cause = _credentials_refused(exc)
        if cause is not None:
            _fail(f"configuration error: {exc.message} ({cause}); not retrying")
            return os.EX_CONFIG
        _fail(f"cannot start: {exc.code}: {exc.message}")
        return os.EX_UNAVAILABLE
    if isinstance(exc, OSError):
        _fail(f"cannot start: {exc}")
        return os.EX_OSERR
    raise exc


if __name__ == "__main__":
    sys.exit(main())
