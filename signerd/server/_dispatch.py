"""What every request passes through before and after its handler.

``Front`` owns the router and the listener: it gives each request a request
id, identifies the peer from the kernel, refuses callers no rule could grant
anything before their body is read (``Gate.admits``), turns every error into
the JSON envelope (405 with ``Allow``), and writes the audit record. For sign
and admin operations the record is written before the answer leaves: when it
cannot be written, the answer is replaced by 503 ``audit_unavailable`` (or,
for an admin operation that has acted, 500 ``outcome_unknown``: see
``_idempotency``, which runs admin changes with their ``intent`` record).
A record the answer does not wait for (a queued one; a sign's outcome after its
durable intent) is queued once the answer is written, with the request log
event and the metrics (``Response.then``).
Each request gets a ``RequestContext`` (``_context``) whose audit operation is
its route's; the handler takes that context.
A refusal of a caller some rule matches, answered before the gate granted the
request anything, costs from its uid's refusal bucket (``Gate.charge_refusal``);
of the 429s, at most one per uid per second is recorded.
``Server`` (``_v1``) adds the v1 handlers; a feature adds its own with
``add_routes``. One event per answered request goes to the request log
(``_requestlog``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..audit import AuditEvent, AuditSink, PendingRecord, QueueingAuditSink, WriteAheadAuditSink
from ..authz import GRANTED, Gate, Operation, Peer
from ..errors import (
    AuditUnavailable,
    InternalError,
    MethodNotAllowed,
    NotFound,
    OutcomeUnknown,
    PermissionDenied,
    RateLimited,
    SignerdError,
)
from ..wire import KeyName, request_id_from
from ._context import (
    OPERATION_NAMES,
    AdminChange,
    AuditNotes,
    Handler,
    RequestContext,
    fresh_request_id,
)
from ._idempotency import AdminRuns, unknown
from ._idemstore import IdempotencyStore
from ._limits import Limits, Throttled
from ._listener import Listener, UidCounter
from ._request import Request, Response, json_response
from ._requestlog import log_request
from ._router import Route, Router
from ._strangers import Strangers

__all__ = ["Front", "Observe", "PeerLookup", "VisibilityGate"]

log = logging.getLogger("signerd.server")

PeerLookup = Callable[[Any], Peer]  # a connected socket -> its peer
#: called once per answered request: (its notes, outcome, status, seconds since it was read)
Observe = Callable[[AuditNotes, str, int, float], None]
UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)
_MAX_QUIET = 4096  # uids whose unrecorded 429s are counted


class VisibilityGate(Gate, Protocol):
    def visible(self, peer: Peer, op: Operation, key: KeyName) -> bool: ...

    def admits(self, peer: Peer) -> bool:
        """False for a caller no rule could grant anything (raises RateLimited when over)."""
        ...

    def charge_refusal(self, peer: Peer) -> None:
        """Charge one refusal of a caller some rule matches; RateLimited when over."""
        ...

    def records_limited(self, peer: Peer) -> bool:
        """Whether a 429 answered to ``peer`` now gets an audit record (one per uid per second)."""
        ...


class Front:
    """Routing, peers, refusals, the error envelope and the audit record."""

    def __init__(
        self,
        *,
        gate: VisibilityGate,
        audit: AuditSink,
        peer_lookup: PeerLookup,
        limits: Limits | None = None,
    ) -> None:
        self.gate = gate
        self.audit = audit
        self._peer_lookup = peer_lookup
        self.limits = limits or Limits()
        self.router = Router()
        self.listener: Listener | None = None
        self._quiet: dict[int, int] = {}  # uid -> 429s not recorded since its last record
        self.quieted = Throttled("signerd.audit_quieted reason=rate_limited", 10.0)
        self._queueing_of: object = None
        self._queueing_sink: QueueingAuditSink | None = None
        self._ahead_of: object = None
        self._ahead_sink: WriteAheadAuditSink | None = None
        self.admin_runs = AdminRuns(IdempotencyStore(None))
        self.observe: Observe | None = None  # the metrics' hook (signerd.metrics)

    @property
    def idempotency(self) -> IdempotencyStore:
        """Where admin requests' ``Idempotency-Key`` are remembered (in this process until
        the daemon sets the workers' shared store)."""
        return self.admin_runs.store

    @idempotency.setter
    def idempotency(self, store: IdempotencyStore) -> None:
        self.admin_runs.store = store

    async def admin_change(self, ctx: RequestContext, change: AdminChange) -> Response:
        """Run an admin change: intent record, ``Idempotency-Key``, outcome (``_idempotency``)."""
        return await self.admin_runs.run(ctx, change)

    def add_routes(self, routes: Iterable[tuple[str, str, Handler, Operation]]) -> None:
        """Routes: (method, path template, async handler, operation) each.

        Handlers take a ``RequestContext`` and return a ``Response``
        (``json_response``); their requests are audited as ``operation``. They
        need a grant, except ``Operation.HEALTH`` (open, not recorded): callers
        no rule matches are refused before their body is read.
        """
        for method, path, handler, operation in routes:
            self.router.add(method, path, handler, operation)

    async def serve(self, sock: socket.socket, shared_uids: UidCounter | None = None) -> Listener:
        """Start answering on a listening socket (already bound and listening); ``shared_uids``
        counts connections per uid across worker processes."""
        strangers = Strangers(lambda: self.gate, self._peer_lookup)
        self.listener = Listener(
            sock, self.dispatch, self.precheck, self.limits, strangers, shared_uids
        )
        self.listener.start()
        return self.listener

    async def close(self, grace: float = 10.0) -> None:
        if self.listener is not None:
            await self.listener.close(grace)

    def peer(self, request: Request) -> Peer:
        slot = request.slot
        if slot is None:
            return UNKNOWN_PEER
        peer = slot.peer
        if peer is None:
            sock = slot.sock
            if sock is None or sock.family != socket.AF_UNIX:
                return UNKNOWN_PEER
            try:
                peer = slot.peer = self._peer_lookup(sock)
            except OSError:
                return UNKNOWN_PEER
        return peer

    # --- before the body: route, peer, could anything be granted -------------------

    def precheck(self, request: Request) -> SignerdError | None:
        """At the end of the head: the refusal of a caller no rule could grant anything."""
        route, _ = self.router.resolve(request)
        if route is None or route.open:
            return None
        return self._refusal(request)

    def _refusal(self, request: Request) -> SignerdError | None:
        try:
            if self.gate.admits(self.peer(request)):
                return None
        except RateLimited as exc:
            return exc
        return PermissionDenied()

    @property
    def answering(self) -> int:
        """Requests this process has read and not answered yet (more than one: the signs and
        intent records of those that arrived together are grouped)."""
        listener = self.listener
        return 0 if listener is None else listener.answering

    async def dispatch(self, request: Request) -> Response:
        started = time.perf_counter()
        given = request.headers.get("X-Request-Id")
        rid = request_id_from(given, "") or fresh_request_id()
        ctx = request.context = RequestContext(self, request, rid, UNKNOWN_PEER, Operation.HEALTH)
        notes = ctx.notes
        headers: dict[str, str] = {"X-Request-Id": rid}
        GRANTED.set(False)
        try:
            ctx.peer = self.peer(request)
            route: Route | None = request.route
            if route is None:
                route, allow = self.router.resolve(request)
                if route is None:
                    if allow:
                        headers["Allow"] = ", ".join(allow)
                        raise MethodNotAllowed()
                    raise NotFound()
                if not route.open and request.refused is None:
                    request.refused = self._refusal(request)
            notes.operation = route.operation
            if request.refused is not None:
                raise request.refused
            response = await route.handler(ctx)
            outcome = "ok"
            if self._follows(ctx, outcome):
                # the answer waits for no record: the record (queued), the request log
                # and the metrics follow the answer (``Response.then``), not precede it
                response.headers.update(headers)
                response.then = functools.partial(self._answered, ctx, response.status, started)
                return response
            await self._record(ctx, "ok", response.status, ctx.reason)
        except SignerdError as refusal:
            exc = self._over_refusals(ctx, _after_acting(ctx, refusal))
            if self._quieted(ctx, exc):
                notes.written = True
            response, outcome = self._error(rid, exc), exc.code
            await self._record(ctx, exc.code, exc.status, exc.message)
        except Exception as exc:
            log.error(
                "signerd.internal_error request_id=%s error=%s traceback=%s",
                rid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            response, outcome = self._error(rid, InternalError()), "internal_error"
            await self._record(ctx, "internal_error", 500, None)
        response.headers.update(headers)
        self._done(ctx, outcome, response.status, started)
        return response

    def _answered(self, ctx: RequestContext, status: int, started: float) -> None:
        """After an answer that waited for no record (``_follows``): its record, request log
        event and metrics."""
        self._queued(ctx, "ok", status, ctx.reason)
        self._done(ctx, "ok", status, started)

    def _done(self, ctx: RequestContext, outcome: str, status: int, started: float) -> None:
        """The request log event and the metrics of an answered request."""
        notes = ctx.notes
        log_request(ctx.rid, OPERATION_NAMES[notes.operation], outcome, status)
        if self.observe is not None:
            self.observe(notes, outcome, status, time.perf_counter() - started)

    def _over_refusals(self, ctx: RequestContext, exc: SignerdError) -> SignerdError:
        """A caller some rule matches, refused before anything was granted to its request:
        one token of its uid's refusal bucket; past it, the answer is 429 instead."""
        if (
            isinstance(exc, RateLimited)
            or ctx.request.refused is not None  # a stranger: charged by ``admits``
            or ctx.notes.operation is Operation.HEALTH  # not recorded
            or GRANTED.get()  # paid for by the grant (its rule's rate)
        ):
            return exc
        try:
            self.gate.charge_refusal(ctx.peer)
        except RateLimited as limited:
            return limited
        return exc

    def _quieted(self, ctx: RequestContext, exc: SignerdError) -> bool:
        """A 429: one audit record per uid per second (the gate's, across workers); the
        others are counted, and the next record says how many were not written."""
        if not isinstance(exc, RateLimited):
            return False
        peer = ctx.peer
        if not self.gate.records_limited(peer):
            if peer.uid not in self._quiet and len(self._quiet) >= _MAX_QUIET:
                self._quiet.clear()
            self._quiet[peer.uid] = self._quiet.get(peer.uid, 0) + 1
            self.quieted.note(uid=peer.uid)
            return True
        skipped = self._quiet.pop(peer.uid, 0)
        if skipped:
            exc.message = f"{exc.message} ({skipped} not recorded)"
        return False

    def _error(self, rid: str, exc: SignerdError) -> Response:
        headers = {"Retry-After": "1"} if exc.retryable else None
        return json_response(exc.to_wire(rid), status=exc.status, headers=headers)

    async def _record(
        self, ctx: RequestContext, outcome: str, status: int, reason: str | None
    ) -> None:
        """Write the final record. For fail-closed operations a failure propagates."""
        if self._queued(ctx, outcome, status, reason):
            return
        audit = ctx.notes
        event = self._event(ctx, outcome, status, reason)
        audit.written = True
        if outcome == "ok" and audit.operation.fails_closed:
            await self.audit.record(event)  # durable before the answer leaves, or a 503
            return
        with contextlib.suppress(AuditUnavailable):
            await self.audit.record(event)
            return
        log.error("signerd.audit_unavailable request_id=%s outcome=%s", ctx.rid, outcome)

    def _follows(self, ctx: RequestContext, outcome: str) -> bool:
        """Whether the answer waits for no record: none is due, or it is queued (``_queued``).
        Only an operation that fails closed and wrote no intent record waits for its own."""
        notes = ctx.notes
        if notes.operation is Operation.HEALTH or notes.written:
            return True
        if notes.ahead:
            return self._writing_ahead() is not None
        if outcome == "ok" and notes.operation.fails_closed:
            return False
        return self._queueing() is not None

    def _queued(self, ctx: RequestContext, outcome: str, status: int, reason: str | None) -> bool:
        """The record of an answer that waits for none (``_follows``), queued for the next group
        write; a success or a sign's outcome joins one within 50 ms (``submit_later``), making
        no write of its own. False, and nothing done, for a record the answer waits for."""
        if not self._follows(ctx, outcome):
            return False
        notes = ctx.notes
        if notes.operation is Operation.HEALTH or notes.written:
            return True
        event = self._event(ctx, outcome, status, reason)
        notes.written = True
        if (notes.ahead or outcome == "ok") and (ahead := self._writing_ahead()) is not None:
            queued = ahead.submit_later(event)  # no write of its own: it joins the next one
        else:  # a refusal or an error: written at once
            queued = (queueing := self._queueing()) is not None and queueing.submit(event)
        if not queued:
            log.error("signerd.audit_unavailable request_id=%s outcome=%s", ctx.rid, outcome)
        return True

    def _event(
        self, ctx: RequestContext, outcome: str, status: int, reason: str | None
    ) -> AuditEvent:
        notes = ctx.notes
        return ctx.event(
            notes.extra_outcome if outcome == "ok" and notes.extra_outcome else outcome,
            status,
            notes.kid,
            notes.hashes,
            reason,
            notes.item_codes,
        )

    def write_ahead(self, event: AuditEvent, group: bool = False) -> PendingRecord | None:
        """``event`` queued for the disk now (``WriteAheadAuditSink``), or None when the
        sink cannot write ahead (the checks run once per sink)."""
        sink = self._writing_ahead()
        return None if sink is None else sink.ahead(event, group)

    def _writing_ahead(self) -> WriteAheadAuditSink | None:
        """``audit`` when it writes ahead (the protocol check runs once per sink)."""
        if self._ahead_of is not self.audit:
            sink = self.audit
            self._ahead_of = sink
            self._ahead_sink = sink if isinstance(sink, WriteAheadAuditSink) else None
        return self._ahead_sink

    def _queueing(self) -> QueueingAuditSink | None:
        """``audit`` when it queues (the protocol check costs microseconds: once per sink)."""
        if self._queueing_of is not self.audit:
            sink = self.audit
            self._queueing_of = sink
            self._queueing_sink = sink if isinstance(sink, QueueingAuditSink) else None
        return self._queueing_sink


def _after_acting(ctx: RequestContext, exc: SignerdError) -> SignerdError:
    """An admin operation that has acted is never answered with a refusal: a 5xx (its
    outcome record could not be written) becomes ``outcome_unknown``."""
    answer = ctx.stall_answer
    if not isinstance(answer, OutcomeUnknown) or exc.status < 500 or exc is answer:
        return exc
    if not isinstance(exc, OutcomeUnknown):
        unknown(ctx.rid, ctx.notes.operation.value, exc)
    return answer
