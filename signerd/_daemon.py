"""The ``signerd`` process: configuration, backends, socket, signals.

    signerd --config /etc/signerd/signerd.toml [--check]

SIGTERM/SIGINT stop it gracefully (in-flight requests finish). SIGHUP reloads
the policy from the configuration file (an invalid policy is refused and the
old one kept) and reopens the audit file (log rotation), without dropping
connections. Under systemd, READY=1 / STOPPING=1 go to $NOTIFY_SOCKET.
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
from collections.abc import Sequence
from dataclasses import dataclass

from ._audit import AuditTrail, audit_from_config
from ._authz import Policy, policy_from_config
from ._backend import Backend, load_factory
from ._config import Config, ConfigError, load
from ._keyservice import KeyService
from ._listener import connection_cap, raise_nofile_limit
from ._peer import peer_of
from ._server import Limits, Server
from ._sockets import SocketError, bind_unix_socket, unlink_own_socket
from .errors import SignerdError

log = logging.getLogger("signerd")


def build_backends(config: Config) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, table in config.backends.items():
        factory = load_factory(str(table["type"]))
        try:
            backends[name] = factory(table)
        except ValueError as exc:
            raise ConfigError(f"backends.{name}.{exc}") from exc
    return backends


def build_policy(config: Config) -> Policy:
    try:
        return policy_from_config(config.policy)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def build_audit(config: Config) -> AuditTrail:
    os.makedirs(os.path.dirname(str(config.audit["path"])), mode=0o750, exist_ok=True)
    try:
        return audit_from_config(config.audit)
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

    @classmethod
    async def start(cls, config: Config) -> Daemon:
        policy = build_policy(config)
        audit = build_audit(config)
        keys = KeyService(
            build_backends(config),
            default_backend=config.default_backend,
            tenant_backends=config.tenant_backends,
            settings=config.settings,
        )
        try:
            await keys.start(config.bootstrap)
        except BaseException:
            await keys.close()
            raise
        limits = _fitted(config)
        server = Server(keys, gate=policy, audit=audit, peer_lookup=peer_of, limits=limits)
        sock = bind_unix_socket(config.socket, mode=config.socket_mode, group=config.socket_group)
        await server.serve(sock)  # accepts on sock as it is: listen(SOMAXCONN) stays
        return cls(config, keys, server, sock)

    def reload(self) -> None:
        """SIGHUP: new policy from the file (kept only when valid) and reopen the audit file."""
        try:
            fresh = load(self.config.path)
            policy = build_policy(fresh)
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
        unlink_own_socket(self.config.socket, self.sock)
        self.sock.close()
        await self.keys.close()
        audit = self.server.audit
        if isinstance(audit, AuditTrail):
            await audit.aclose()


def _notify(message: str) -> None:
    """sd_notify without a dependency: one datagram to $NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message.encode())
        except OSError:
            log.warning("signerd.notify_failed")


async def serve(config: Config) -> None:
    started = time.monotonic()
    daemon = await Daemon.start(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, daemon.reload)
    log.info(
        "signerd.ready socket=%s keys=%d took=%.3f",
        config.socket,
        daemon.keys.key_count,
        time.monotonic() - started,
    )
    _notify("READY=1")
    try:
        await stop.wait()
    finally:
        _notify("STOPPING=1")
        log.info("signerd.stopping")
        await daemon.stop()


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )


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
        asyncio.run(serve(config))
    except ConfigError as exc:
        print(f"signerd: configuration error: {exc}", file=sys.stderr)
        return os.EX_CONFIG
    except SocketError as exc:
        print(f"signerd: cannot listen: {exc}", file=sys.stderr)
        return os.EX_CANTCREAT
    except SignerdError as exc:
        print(f"signerd: cannot start: {exc.code}: {exc.message}", file=sys.stderr)
        return os.EX_UNAVAILABLE
    except OSError as exc:
        print(f"signerd: cannot start: {exc}", file=sys.stderr)
        return os.EX_OSERR
    return os.EX_OK


if __name__ == "__main__":
    sys.exit(main())
