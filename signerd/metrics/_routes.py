"""``GET /metrics`` and ``GET /v1/status`` on the daemon's socket, and the hooks behind them.

``Metrics(sources, server, directory)`` sets the recorder's hooks (the
server's ``observe``, the coalescer's, the audit write timer), adds both
routes and keeps this worker's audit gauges current (once a second). With
``[metrics] enabled = false`` no hook is set and ``/metrics`` answers 404;
``/v1/status`` is served either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from ..audit import AuditEvent, AuditSink, PendingRecord, WriteAheadAuditSink
from ..authz import Operation
from ..server import RequestContext, Response, Server, json_response
from ._exposition import CONTENT_TYPE, render
from ._recorder import Recorder, use_directory
from ._state import VERSION, Snapshot, Sources, snapshot

__all__ = ["ROUTES", "Metrics", "status_doc"]

TICK = 1.0  # seconds between updates of this worker's audit gauges
#: (method, path, handler method name, operation), also checked against openapi.json;
#: /metrics is served only while [metrics] enabled
ROUTES: tuple[tuple[str, str, str, Operation], ...] = (
    ("GET", "/metrics", "metrics", Operation.METRICS),
    ("GET", "/v1/status", "status", Operation.STATUS),
)


class _TimedAudit:
    """The server's audit sink, timing each record a request waits for: a record written
    before the answer, and a sign's intent from its queueing until it is durable. What
    the sink can do (write ahead, queue) it still does: ``_write_ahead`` gives the
    intents' methods only when the sink has them (``submit`` is not timed)."""

    def __init__(self, sink: AuditSink, observe: Callable[[float], None]) -> None:
        self._sink = sink
        self._observe = observe

    async def record(self, event: AuditEvent) -> None:
        started = time.perf_counter()
        try:
            await self._sink.record(event)
        finally:
            self._observe(time.perf_counter() - started)

    def submit(self, event: AuditEvent) -> bool:
        submit = getattr(self._sink, "submit", None)
        return False if submit is None else bool(submit(event))


class _TimedAhead(_TimedAudit):
    """``_TimedAudit`` of a sink that writes ahead (``WriteAheadAuditSink``)."""

    def __init__(self, sink: WriteAheadAuditSink, observe: Callable[[float], None]) -> None:
        super().__init__(sink, observe)
        self._ahead = sink

    def ahead(self, event: AuditEvent, group: bool = False) -> PendingRecord:
        return _TimedPending(self._ahead.ahead(event, group), self._observe)

    def submit_later(self, event: AuditEvent) -> bool:
        return self._ahead.submit_later(event)


class _TimedPending:
    """An intent record, timed from its queueing until its caller saw it durable."""

    __slots__ = ("_observe", "_pending", "_started")

    def __init__(self, pending: PendingRecord, observe: Callable[[float], None]) -> None:
        self._pending, self._observe = pending, observe
        self._started = time.perf_counter()

    async def durable(self) -> None:
        try:
            await self._pending.durable()
        finally:
            self._observe(time.perf_counter() - self._started)


def _timed(sink: AuditSink, observe: Callable[[float], None]) -> _TimedAudit:
    if isinstance(sink, WriteAheadAuditSink):
        return _TimedAhead(sink, observe)
    return _TimedAudit(sink, observe)


class Metrics:
    def __init__(self, sources: Sources, server: Server, directory: str) -> None:
        self.sources = sources
        self.directory = directory
        self.recorder: Recorder | None = None
        self._ticker: asyncio.Task[None] | None = None
        #: each cluster backend's failovers as this worker last counted them
        self._failovers = {
            name: 0
            for name, backend in sources.backends.items()
            if isinstance(getattr(backend, "failovers", None), int)
        }
        served = [r for r in ROUTES if sources.config.metrics or r[3] is not Operation.METRICS]
        if sources.config.metrics:
            use_directory(directory)
            keys = sources.keys
            rec = self.recorder = Recorder(keys.backend_name, sources.config.backends)
            server.observe = rec.request
            keys.coalescer.observe = lambda group, size, queued, took: rec.batch(
                keys.backend_name(group[0].tenant), size, queued, took
            )
            server.audit = _timed(server.audit, rec.audit_written)
            for name in self._failovers:
                rec.failed_over(name, 0)
            self._tick()
            self._ticker = asyncio.get_running_loop().create_task(self._ticking())
        server.add_routes((m, p, getattr(self, name), op) for m, p, name, op in served)

    def _tick(self) -> None:
        if self.recorder is not None:
            queued, stuck = self.sources.audit.backlog()
            self.recorder.audit_queue.set(queued)
            self.recorder.audit_healthy.set(0 if stuck else 1)
            for name, seen in self._failovers.items():
                count = getattr(self.sources.backends[name], "failovers", seen)
                if isinstance(count, int) and count > seen:
                    self.recorder.failed_over(name, count - seen)
                    self._failovers[name] = count

    async def _ticking(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            self._tick()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker

    async def metrics(self, ctx: RequestContext) -> Response:
        """The Prometheus text exposition, summed over the workers."""
        ctx.authorize(Operation.METRICS, None, None)
        self._tick()
        snap = await snapshot(self.sources)
        body = await asyncio.to_thread(render, self.directory, snap)
        return Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def status(self, ctx: RequestContext) -> Response:
        """The daemon's state for operators (``signerctl status``)."""
        ctx.authorize(Operation.STATUS, None, None)
        return json_response(status_doc(await snapshot(self.sources)))


def status_doc(snap: Snapshot) -> dict[str, Any]:
    """The JSON of ``GET /v1/status`` (names, codes, numbers: nothing a caller sent)."""
    problems = snap.problems
    return {
        "status": "degraded" if problems else "healthy",
        "problems": problems,
        "version": VERSION,
        "started_at": int(snap.started),
        "uptime_seconds": round(snap.now - snap.started, 3),
        "backends": [
            {"name": b.name, "type": b.type, "up": b.up, "code": b.code, "node": b.node}
            for b in snap.backends
        ],
        "keys": [
            {
                "key": k.key,
                "backend": k.backend,
                "active_kid": k.active_kid,
                "active_created_at": k.active_created,
                "age_seconds": None
                if k.active_created is None
                else round(snap.now - k.active_created, 3),
                "versions": k.versions,
                "max_active_age": None if k.due is None else k.due.max_age,
                "rotation_due_at": None if k.due is None else k.due.at,
                "overdue": k.due is not None and k.due.overdue,
            }
            for k in snap.keys
        ],
        "keys_total": snap.keys_total,
        "audit": {
            "healthy": snap.audit_healthy,
            "queued": snap.audit_queued,
            "forwarding": _forwarding_doc(snap),
        },
        "nonces": {"store": snap.nonce_store, "entries": snap.nonce_entries},
        "workers": [
            {
                "index": w.index,
                "pid": w.pid,
                "uptime_seconds": round(snap.now - w.started, 3),
                "restarts": w.restarts,
            }
            for w in snap.workers
        ],
    }


def _forwarding_doc(snap: Snapshot) -> dict[str, Any] | None:
    """The audit forwarder's state, or None without [forwarding]."""
    fwd = snap.forwarding
    if fwd is None:
        return None
    return {
        "healthy": fwd.healthy,
        "refusing": fwd.refusing,
        "lag_bytes": fwd.lag_bytes,
        "heartbeat_age_seconds": None if fwd.heartbeat_age is None else round(fwd.heartbeat_age, 3),
    }
