"""Admin operations whose answers say what happened, and ``Idempotency-Key``.

Every admin operation (create, rotate, promote, retire, destroy, trusted-key
changes) runs here, holding the admin lock (one admin operation at a time in
a process; across workers, the workers' lock):

1. intents of the same target whose requests never finished (their worker
   was killed, or stalled and ended) are settled first: the target is read,
   and each is found made (its answer is kept for its retry) or not made
   (forgotten). So nothing done meanwhile is mistaken for it;
2. with an ``Idempotency-Key`` (1-64 of ``[A-Za-z0-9._:-]``, else 400
   ``invalid_request``), a key this caller used before for the same request
   answers that request's answer again, marked ``Idempotent-Replayed: true``,
   without acting; for another request it is 422 ``idempotency_key_reused``;
3. the ``intent`` audit record is written (fails closed: a failure refuses
   the operation, which has not started), then the intent is stored with the
   target's state before the change;
4. the change. From here on a failure is not a refusal: a stalled worker
   (``StallGuard``) and a change whose backend call failed with a 5xx, or
   whose outcome record cannot be written, answer 500 ``outcome_unknown``,
   and the intent stays until a retry settles it. A 4xx (the change was
   refused before anything changed) forgets the intent;
5. the answer is stored, and dispatch writes the outcome record.

A caller's keys are its own (scoped by uid); the store keeps their hashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator

from ..errors import (
    BackendSealed,
    BackendUnavailable,
    IdempotencyKeyReused,
    InvalidRequest,
    InvalidState,
    NotSupported,
    OutcomeUnknown,
    SignerdError,
)
from ._context import AdminChange, RequestContext
from ._idemstore import Entry, IdempotencyStore
from ._request import Request, Response

__all__ = [
    "HEADER",
    "REPLAYED",
    "AdminRuns",
    "idempotency_key",
]

log = logging.getLogger("signerd.admin")

HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
_KEY_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_LOCAL_TIMEOUT = 10.0  # seconds an admin request waits for another one of this process
_DEFINITE = (BackendSealed, NotSupported)  # 5xx answered before the backend changed anything


def idempotency_key(request: Request) -> str | None:
    """The request's ``Idempotency-Key``, or None; InvalidRequest when it is malformed."""
    value = request.headers.get(HEADER)
    if value is None:
        return None
    if _KEY_RE.fullmatch(value) is None:
        raise InvalidRequest("Idempotency-Key must be 1-64 of [A-Za-z0-9._:-]")
    return str(value)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class AdminRuns:
    """Runs admin changes for a ``Front`` (see the module's steps)."""

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self._local: asyncio.Lock | None = None
        self._local_loop: asyncio.AbstractEventLoop | None = None

    async def run(self, ctx: RequestContext, change: AdminChange) -> Response:
        key = idempotency_key(ctx.request)
        async with self._serial(), change.lock():
            await self._settle(change)
            entry = None
            if key is not None:
                scope = _sha256(f"{ctx.peer.uid}:{key}")
                fingerprint = _sha256(change.what)
                found = await self.store.get(scope)
                if found is not None:
                    if found.fingerprint != fingerprint:
                        raise IdempotencyKeyReused()
                    return await self._replay(ctx, change, found)
                before = await change.before()
                entry = Entry(
                    scope,
                    time.time(),
                    change.target,
                    change.kind,
                    fingerprint,
                    ctx.rid,
                    before,
                )
            await ctx.intent()
            if entry is not None:
                await self.store.begin(entry)
            return await self._act(ctx, change, entry)

    @contextlib.asynccontextmanager
    async def _serial(self) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if self._local is None or self._local_loop is not loop:
            self._local, self._local_loop = asyncio.Lock(), loop
        local = self._local
        try:
            await asyncio.wait_for(local.acquire(), _LOCAL_TIMEOUT)
        except TimeoutError:
            raise BackendUnavailable("another administrative operation is in progress") from None
        try:
            yield
        finally:
            local.release()

    async def _settle(self, change: AdminChange) -> None:
        """Intents of the target whose requests ended while acting: made, or forgotten."""
        for orphan in await self.store.intents(change.target):
            made = await change.made(orphan.kind, orphan.before)
            if made is None:
                await self.store.forget(orphan.scope)
            else:
                answer, kid = made
                await self.store.finish(orphan, answer.status, answer.body, kid)
            log.warning(
                "signerd.admin_outcome_settled request_id=%s operation=%s made=%s",
                orphan.request_id,
                orphan.kind,
                "yes" if made is not None else "no",
            )

    async def _replay(self, ctx: RequestContext, change: AdminChange, entry: Entry) -> Response:
        if entry.status is not None and entry.body is not None:
            answer, kid = Response(body=entry.body, status=entry.status), entry.kid
        else:  # an answer too large to keep: the target as it is now
            made = await change.made(entry.kind, entry.before)
            if made is None:
                raise InvalidState("what this Idempotency-Key made is no longer there")
            answer, kid = made
        answer.headers[REPLAYED] = "true"
        notes = ctx.notes
        notes.kid = kid or notes.kid
        notes.extra_outcome = "replayed"
        ctx.reason = f"replay of request {entry.request_id}"
        return answer

    async def _act(self, ctx: RequestContext, change: AdminChange, entry: Entry | None) -> Response:
        ctx.stall_answer = OutcomeUnknown()
        try:
            answer = await change.apply()
        except SignerdError as exc:
            if exc.status < 500 or isinstance(exc, _DEFINITE):
                ctx.stall_answer = None  # refused before anything changed
                if entry is not None:
                    with contextlib.suppress(BackendUnavailable):
                        await self.store.forget(entry.scope)
                raise
            unknown(ctx.rid, change.kind, exc)
            raise OutcomeUnknown() from exc
        except Exception as exc:
            unknown(ctx.rid, change.kind, exc)
            raise OutcomeUnknown() from exc
        if entry is not None:
            try:
                await self.store.finish(entry, answer.status, answer.body, ctx.notes.kid)
            except BackendUnavailable:  # the intent stays: a retry finds the change by looking
                log.error("signerd.idempotency_store_failed request_id=%s", ctx.rid)
        return answer


def unknown(rid: str, kind: str, exc: BaseException) -> None:
    """Log an admin operation whose outcome is not known (its answer is ``outcome_unknown``)."""
    code = exc.code if isinstance(exc, SignerdError) else type(exc).__name__
    log.error(
        "signerd.admin_outcome_unknown request_id=%s operation=%s error=%s",
        rid,
        kind,
        code,
    )
