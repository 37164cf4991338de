"""The composition root: one running signerd built from its configuration and its role.

``Daemon.start`` builds the same parts in every process that serves: the
backends, the key service, the policy, the audit trail, the server, the
federation's endpoints and the listener. What differs between a single process
and one worker among several is the ``ProcessRole`` it is given (the audit
file, the shared rate-limit table and connection counts, the admin lock, the
stall guard); each part gets what it needs from the role when it is built.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from .._config import Config, ConfigError, load
from ..audit import AuditEvent, AuditSink, AuditTrail, audit_from_config
from ..authz import Policy, peer_of, policy_from_config
from ..backends import Backend, load_factory
from ..errors import AuditUnavailable, SignerdError
from ..federation import Federation, attach
from ..federation import check_reload as check_federation_reload
from ..forwarding import LAG_PAGE, MAX_SILENCE, GatedSink, LagGate
from ..keys import KeyService
from ..metrics import Metrics, Sources, metrics_directory
from ..server import (
    IdempotencyStore,
    Limits,
    Listener,
    Server,
    UidCounter,
    connection_cap,
    raise_nofile_limit,
)
from ..workers import runtime_path
from ._deletions import DeletionReaper
from ._sockets import bind_unix_socket, unlink_own_socket

if TYPE_CHECKING:
    from ..wire import KeyName
    from ..workers import SharedBuckets, StallGuard, WorkerTable

__all__ = [
    "AdminGuard",
    "Daemon",
    "ProcessRole",
    "TrustGuard",
    "build_backends",
    "build_policy",
]

log = logging.getLogger("signerd")

_STALL_RECORD_SECONDS = 1.0  # the stall guard's records wait this long for the file, at most

#: held around one key administration operation (create, rotate, ...)
AdminGuard = Callable[["KeyName"], contextlib.AbstractAsyncContextManager[None]]
#: held around a change of the federation's trusted keys
TrustGuard = Callable[[], contextlib.AbstractAsyncContextManager[None]]


class ProcessRole(Protocol):
    """What the process a ``Daemon`` runs in supplies to it."""

    #: removes the socket file at stop (the worker's socket is the supervisor's)
    owns_socket: bool

    @property
    def audit_file(self) -> tuple[int | None, int | None]:
        """(this worker's index, how many workers there are), or (None, None): one file."""
        ...

    @property
    def buckets(self) -> SharedBuckets | None:
        """The rate-limit table shared by the processes, or None for the policy's own."""
        ...

    @property
    def uid_counter(self) -> UidCounter | None:
        """Open connections per uid counted across processes, or None."""
        ...

    @property
    def admin_guard(self) -> AdminGuard | None: ...

    @property
    def worker_table(self) -> WorkerTable:
        """Each worker slot's pid, start and restarts (this process writes its own slot)."""
        ...

    @property
    def trust_guard(self) -> TrustGuard | None: ...

    def stall_guard(
        self, config: Config, last_answers: Callable[[SignerdError], int]
    ) -> StallGuard | None:
        """The guard of blocking calls made on the loop's thread, or None when there are none."""
        ...

    def initialised(self) -> None:
        """The backends' libraries are open; the keys are read next."""
        ...

    def on_ready(self, keys: KeyService) -> None:
        """Serving: the process's signals are handled, requests are answered."""
        ...


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


def check_reload(old: Config, fresh: Config) -> None:
    """ConfigError unless a reload may take ``fresh`` over ``old``: the domain map may route
    tenants anew over the same backends, and ``[federation]`` may change all but its nonce
    store; anything else of those needs a restart."""
    if fresh.backends != old.backends:
        raise ConfigError("backends: a backend added, removed or changed needs a restart")
    try:
        check_federation_reload(old.federation, fresh.federation)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _build_audit(config: Config, role: ProcessRole, guard: StallGuard | None) -> AuditTrail:
    """The audit trail, in the file the role names; its directory is created if need be."""
    worker, workers = role.audit_file
    os.makedirs(os.path.dirname(str(config.audit["path"])), mode=0o750, exist_ok=True)
    try:
        return audit_from_config(config.audit, worker=worker, workers=workers, stall_guard=guard)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def flag_path(config: Config) -> str:
    """The file the forwarder and the workers share: whether signs are refused."""
    return runtime_path(config.socket, LAG_PAGE)


def _gated(config: Config, audit: AuditTrail) -> AuditSink:
    """The sink the server writes to: past the forwarding bound, signs are refused."""
    if config.forwarding is None or config.forwarding.on_lag != "refuse":
        return audit
    # a sign is refused at its intent record, before the token is asked
    return GatedSink(audit, LagGate(flag_path(config), MAX_SILENCE))


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


class _InFlight:
    """The requests a stall guard answers: those of the listener, once there is one.

    The guard is built before the key service and the audit trail that use it,
    and so before the server and its listener; nothing it guards runs before
    the listener exists. The answers' audit records are written before the answers
    (bounded: one write of at most 256 records, within one second), except when the
    audit file is what is stuck (``audit_unavailable``).
    """

    listener: Listener | None = None
    audit: AuditTrail | None = None

    def last_answers(self, exc: SignerdError) -> int:
        listener = self.listener
        if listener is None:
            return 0
        audit = self.audit
        if audit is None or isinstance(exc, AuditUnavailable):
            return listener.last_answers(exc)
        return listener.last_answers(exc, lambda events: self._record(audit, events))

    @staticmethod
    def _record(audit: AuditTrail, events: list[AuditEvent]) -> None:
        written = audit.write_now(events, _STALL_RECORD_SECONDS)
        log.warning("signerd.worker_stalled_records written=%d of=%d", written, len(events))


@dataclass
class Daemon:
    """A running signerd: its parts, the listening socket and the role it was given."""

    config: Config
    role: ProcessRole
    keys: KeyService
    policy: Policy
    audit: AuditTrail
    server: Server
    federation: Federation
    sock: socket.socket
    metrics: Metrics
    guard: StallGuard | None = None
    reaper: DeletionReaper | None = None  # due deletions: in one process only

    @classmethod
    async def start(
        cls, config: Config, role: ProcessRole, sock: socket.socket | None = None
    ) -> Daemon:
        """Start serving on ``sock`` (activated or inherited), or on one bound here when None.

        The socket is bound only once the backends are up, so a caller that
        finds it finds a signerd that answers.
        """
        policy = build_policy(config, role.buckets)
        in_flight = _InFlight()
        async with contextlib.AsyncExitStack() as undo:  # a failed start closes what it opened
            guard = role.stall_guard(config, in_flight.last_answers)
            if guard is not None:
                undo.callback(guard.close)
            audit = _build_audit(config, role, guard)
            in_flight.audit = audit
            undo.push_async_callback(audit.aclose)
            audit.open()  # anchored at start: every chain of the run has an anchor of it
            backends = build_backends(config)
            keys = KeyService(
                backends,
                default_backend=config.default_backend,
                tenant_backends=config.tenant_backends,
                settings=config.settings,
                admin_guard=role.admin_guard,
                stall_guard=guard,
            )
            undo.push_async_callback(keys.close)
            await keys.start(config.bootstrap, opened=role.initialised)
            limits = _fitted(config)
            server = Server(
                keys,
                gate=policy,
                audit=_gated(config, audit),
                peer_lookup=peer_of,
                limits=limits,
                jwk_alg=config.jwk_alg,
            )
            server.idempotency = IdempotencyStore(  # shared by the workers, in the runtime dir
                runtime_path(config.socket, "idempotency.db"),
                ttl=config.settings.idempotency_ttl,
                max_entries=config.settings.idempotency_max_entries,
            )
            federation = Federation.from_settings(
                server,
                config.federation,
                max_body_bytes=config.limits.max_body_bytes,
                admin_guard=role.trust_guard,
            )
            federation.trust.jwk_alg = config.jwk_alg
            undo.push_async_callback(federation.close)
            attach(server, federation)
            role.worker_table.serving(role.audit_file[0] or 0, os.getpid())
            lag = LagGate(flag_path(config), MAX_SILENCE) if config.forwarding else None
            sources = Sources(config, keys, audit, federation, role.worker_table, backends, lag)
            metrics = Metrics(sources, server, metrics_directory(config))
            undo.push_async_callback(metrics.close)
            if sock is None:
                sock = bind_unix_socket(
                    config.socket, mode=config.socket_mode, group=config.socket_group
                )
            # accepts on sock as it is: listen(SOMAXCONN) stays
            in_flight.listener = await server.serve(sock, role.uid_counter)
            reaper = None
            if role.audit_file[0] in (None, 0):  # the single process, or worker 0
                reaper = DeletionReaper(keys, audit)
                reaper.start()
            undo.pop_all()
        return cls(
            config, role, keys, policy, audit, server, federation, sock, metrics, guard, reaper
        )

    def ready(self) -> None:
        """Tell the role that this process serves (its signal handlers are in place).

        What start-up made (the keyring: objects per key version) is moved out of
        the cyclic garbage collector's reach first (``gc.freeze``): with 10,000
        versions a full collection otherwise walks all of it in the middle of
        requests (22-60 ms for the keyring alone on a loaded 2-core machine, 0
        frozen). What is replaced later is still freed by reference counting."""
        gc.freeze()
        self.role.on_ready(self.keys)

    def reload(self) -> bool:
        """SIGHUP: the policy, the domain map and ``[federation]`` from the file, all or none
        (``check_reload``), and reopen the audit file. Whether the new ones were applied."""
        try:
            fresh = load(self.config.path)
            policy = build_policy(fresh, self.role.buckets)
            check_reload(self.config, fresh)
        except ConfigError as exc:
            log.error("signerd.reload_refused error=%s", exc)
            applied = False
        else:
            self.policy = self.server.gate = policy.with_state_from(self.policy)
            self.keys.remap(fresh.default_backend, fresh.tenant_backends)
            self.federation.reconfigure(fresh.federation)
            self.config = dataclasses.replace(
                self.config,
                policy=fresh.policy,
                default_backend=fresh.default_backend,
                tenant_backends=fresh.tenant_backends,
                federation=fresh.federation,
            )
            log.info("signerd.policy_reloaded")
            log.info("signerd.domains_reloaded tenants=%d", len(fresh.tenant_backends))
            applied = True
        self.audit.reopen()
        return applied

    async def stop(self) -> None:
        if self.reaper is not None:
            await self.reaper.close()
        await self.server.close()
        await self.metrics.close()
        if self.role.owns_socket:
            unlink_own_socket(self.config.socket, self.sock)
        self.sock.close()
        await self.keys.close()
        await self.federation.close()
        await self.audit.aclose()
        if self.guard is not None:
            self.guard.close()
