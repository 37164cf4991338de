"""One request as its handler sees it: the ``RequestContext``.

Dispatch builds one per request, with the request id, the peer (from the
kernel) and the audit notes, whose operation is the route's, and hands it to
the handler. Every handler (v1 and federation) reads its body, authorizes
and runs its admin change through it, so each of those rules exists once:

- ``ctx.json(allowed, required)``: the body as a JSON object with only
  ``allowed`` fields and every ``required`` one (``application/json`` unless
  the request has no body and nothing is required); with ``depth``, parsed
  as the federation's canonical JSON, bounded in size and depth;
- ``ctx.authorize(op, tenant, key)``: the policy's judgement of the call
  (raises), the tenant and key noted for the audit record first;
- ``await ctx.admin(change)``: an admin change with its ``intent`` record and
  ``Idempotency-Key`` (``_idempotency``); ``await ctx.intent()`` writes that
  record.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..audit import AuditEvent, AuditSink, PendingRecord
from ..authz import Call, Gate, Operation, Peer
from ..errors import InvalidRequest, SignerdError, UnsupportedMediaType
from ..wire import KeyName, parse_json, parse_object
from ._limits import Limits
from ._request import Request, Response

__all__ = [
    "OPERATION_NAMES",
    "AdminChange",
    "AuditNotes",
    "Handler",
    "Made",
    "RequestContext",
    "Services",
    "check_fields",
    "fresh_request_id",
    "sha256_hex",
]

_ids: tuple[str, itertools.count[int]] = (secrets.token_hex(8), itertools.count())


def _new_ids() -> None:
    global _ids
    _ids = (secrets.token_hex(8), itertools.count())


os.register_at_fork(after_in_child=_new_ids)  # each worker draws its own prefix


def fresh_request_id() -> str:
    """32 hex digits, unique across processes and restarts: a random prefix per process
    and a counter (uuid4 costs a getrandom call and an object per request)."""
    prefix, counter = _ids
    return f"{prefix}{next(counter) & 0xFFFFFFFFFFFFFFFF:016x}"


#: each operation's name (``.value`` is a Python-level property; this is a dict lookup)
OPERATION_NAMES = {op: op.value for op in Operation}
Made = tuple[Response, str | None]  # the answer of a change found made, and the kid it names


@dataclass(frozen=True)
class AdminChange:
    """One admin request, as ``_idempotency`` needs it said."""

    kind: str  # create, rotate, promote, retire, destroy, trust-add, trust-retire
    target: str  # what it changes: "key TENANT/NAME", "trust TENANT KID"
    what: str  # all the request asks, in words (its fingerprint is this text's hash)
    lock: Callable[[], contextlib.AbstractAsyncContextManager[None]]
    apply: Callable[[], Awaitable[Response]]
    before: Callable[[], Awaitable[Any]]  # JSON: the target's state the change alters
    made: Callable[[str, Any], Awaitable[Made | None]]  # (kind, before): found made?


class Services(Protocol):
    """What a request's context uses of the server (read at each use: SIGHUP swaps the gate)."""

    @property
    def gate(self) -> Gate: ...

    @property
    def audit(self) -> AuditSink: ...

    def write_ahead(self, event: AuditEvent, group: bool = False) -> PendingRecord | None:
        """Queue ``event`` for the disk now (``group``: at the end of this loop turn), or
        None when the audit sink cannot."""
        ...

    @property
    def limits(self) -> Limits: ...

    async def admin_change(self, ctx: RequestContext, change: AdminChange) -> Response: ...


@dataclass(slots=True)
class AuditNotes:
    """What a handler learned about its request, for the audit record."""

    operation: Operation = Operation.HEALTH
    #: the audit record's operation when it is not the route's (e.g. schedule-deletion)
    action: str | None = None
    tenant: str | None = None
    key: str | None = None
    kid: str | None = None
    hashes: tuple[str, ...] = ()
    extra_outcome: str | None = None
    item_codes: tuple[str, ...] = ()
    written: bool = False
    #: the intent records written ahead of the operation (all durable before its answer)
    ahead: list[PendingRecord] | None = None


class RequestContext:
    """One request being answered: its id, its caller, what the audit record will say."""

    __slots__ = ("group", "notes", "peer", "reason", "request", "rid", "server", "stall_answer")

    def __init__(
        self, server: Services, request: Request, rid: str, peer: Peer, operation: Operation
    ) -> None:
        self.server = server
        self.request = request
        self.rid = rid
        self.peer = peer
        self.notes = AuditNotes(operation)
        self.reason: str | None = (
            None  # the audit record's reason for an answer that is not a refusal
        )
        self.stall_answer: SignerdError | None = (
            None  # what any 5xx becomes (an admin change acting)
        )
        #: this request's sign and intent record may wait for the rest of the loop turn's
        self.group = False

    def stall_record(self, answer: SignerdError) -> AuditEvent | None:
        """The record of the last answer the stall guard gives this request (its worker
        ends next): None for a request that has no record, or has written it already."""
        notes = self.notes
        if notes.operation is Operation.HEALTH or notes.written:
            return None
        return self.event(answer.code, answer.status, notes.kid, notes.hashes, "worker_stalled")

    def event(
        self,
        outcome: str,
        status: int,
        kid: str | None,
        hashes: tuple[str, ...] = (),
        reason: str | None = None,
        item_codes: tuple[str, ...] = (),
    ) -> AuditEvent:
        """A record of this request (its time, id, peer, operation, tenant and key now)."""
        notes = self.notes
        return AuditEvent(
            time=time.time(),
            request_id=self.rid,
            peer=self.peer,
            operation=notes.action or OPERATION_NAMES[notes.operation],
            outcome=outcome,
            tenant=notes.tenant,
            key=notes.key,
            kid=kid,
            payload_sha256=hashes,
            reason=reason,
            status=status,
            item_codes=item_codes,
        )

    def json(
        self,
        allowed: set[str],
        required: set[str],
        *,
        depth: int | None = None,
        max_bytes: int = 0,
    ) -> dict[str, Any]:
        """The body, a JSON object of ``allowed`` fields with every ``required`` one. With
        ``depth``: canonical JSON (``wire``) at most ``depth`` deep and ``max_bytes`` long."""
        request = self.request
        if request.content_type != "application/json" and (
            depth is not None or request.can_read_body or required
        ):
            raise UnsupportedMediaType()
        raw = request.body()
        if depth is None:
            return parse_object(raw, allowed, required)
        body = parse_json(raw, max_bytes=max_bytes, max_depth=depth)
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        return check_fields(body, allowed, required, "")

    def authorize(self, op: Operation, tenant: str | None, key: KeyName | None) -> None:
        """Note the tenant and key for the audit record, then ask the policy (raises)."""
        notes = self.notes
        notes.tenant = tenant
        if key is not None:
            notes.key = str(key)
        self.server.gate.authorize(Call(self.peer, op, tenant, key))

    async def admin(self, change: AdminChange) -> Response:
        """Run an admin change: intent record, ``Idempotency-Key``, outcome (``_idempotency``)."""
        return await self.server.admin_change(self, change)

    def sign_intent(self, kid: str) -> None:
        """Queue the intent record of a sign about to be made with ``kid`` (its fsync runs
        while the token signs); ``durable`` waits for it. Without a write-ahead sink the
        final record is written before the answer instead."""
        notes = self.notes
        pending = self.server.write_ahead(self.event("intent", 0, kid, notes.hashes), self.group)
        if pending is not None:
            if notes.ahead is None:
                notes.ahead = []
            notes.ahead.append(pending)

    async def durable(self) -> None:
        """Wait until every intent record of this request is on disk (AuditUnavailable)."""
        for pending in self.notes.ahead or ():
            await pending.durable()

    async def intent(self) -> None:
        """The record an admin operation writes before it acts (fails closed)."""
        await self.server.audit.record(self.event("intent", 0, self.notes.kid))


Handler = Callable[[RequestContext], Awaitable[Response]]


def check_fields(
    body: dict[str, Any], allowed: set[str], required: set[str], where: str
) -> dict[str, Any]:
    """``body`` when it has only ``allowed`` fields and every ``required`` one (the federation's
    messages: ``where`` names a nested object); InvalidRequest otherwise."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field in {where or 'the body'}")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidRequest(f"missing field {missing[0]!r}" + (f" in {where}" if where else ""))
    return body


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of a payload as the audit record holds it."""
    return hashlib.sha256(data).hexdigest()
