"""The periodic task that destroys versions whose scheduled deletion is due.

It runs in one process of a daemon only (the single process, or worker 0 of
several: the supervisor holds no backend); daemons sharing a store each run
one, and the key service's ``destroy_due`` makes a second destroy of the
same version a no-op. Each pass reads the cached keyring (no backend call
unless something is due). A destroy is written to the audit trail before it
is made (outcome ``intent``) and after (``ok`` or the error code), as
operation ``destroy`` by the daemon's own process, reason ``deletion due``;
when the intent record cannot be written, nothing is destroyed. A version
whose due destroy fails (an OpenBao version with an older one not destroyed
yet, the audit trail or the store unavailable) is tried again after 30 s,
then after twice as long each time, up to an hour: its records stay bounded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid

from ..audit import AuditEvent, AuditSink
from ..authz import Peer
from ..errors import SignerdError
from ..keys import KeyService
from ..wire import KeyName

__all__ = ["DeletionReaper"]

log = logging.getLogger("signerd.keys")

#: seconds between two looks at the cached keyring for due deletions
PERIOD = 1.0
#: a version whose due destroy failed is tried again after this long, doubling up to MAX
RETRY, MAX_RETRY = 30.0, 3600.0
_REASON = "deletion due"


class DeletionReaper:
    """Destroys due versions every ``period`` seconds until ``close``."""

    def __init__(self, keys: KeyService, audit: AuditSink, period: float = PERIOD) -> None:
        self.keys, self.audit, self.period = keys, audit, period
        self._task: asyncio.Task[None] | None = None
        #: kids whose due destroy failed: (when to try again, the wait before that)
        self._blocked: dict[str, tuple[float, float]] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period)
            now = time.time()
            for key, version in self.keys.deletions.due(self.keys.cached(), now):
                if self._blocked.get(key.kid(version), (0.0, 0.0))[0] > now:
                    continue
                try:
                    await self.reap(key, version)
                except Exception:  # the task must go on; the next pass tries again
                    log.exception("signerd.deletion_failed kid=%s", key.kid(version))

    async def reap(self, key: KeyName, version: int) -> bool:
        """Destroy ``version`` of ``key`` if it is due; whether it was destroyed here."""
        rid = uuid.uuid4().hex
        kid = key.kid(version)

        async def before(kid: str) -> None:
            await self.audit.record(self._event(rid, key, kid, "intent"))

        try:
            info = await self.keys.deletions.destroy_due(key, version, before)
        except SignerdError as exc:
            _, wait = self._blocked.get(kid, (0.0, 0.0))
            if not wait:
                log.warning("signerd.deletion_blocked kid=%s code=%s", kid, exc.code)
            wait = min(MAX_RETRY, wait * 2 or RETRY)
            self._blocked[kid] = (time.time() + wait, wait)
            await self._final(rid, key, kid, exc.code, exc.message)
            return False
        self._blocked.pop(kid, None)
        if info is None:
            return False
        log.info("signerd.deletion_done kid=%s", kid)
        await self._final(rid, key, kid, "ok", _REASON)
        return True

    async def _final(self, rid: str, key: KeyName, kid: str, outcome: str, reason: str) -> None:
        try:
            await self.audit.record(self._event(rid, key, kid, outcome, reason))
        except SignerdError as exc:
            log.error("signerd.audit_unavailable request_id=%s outcome=%s", rid, exc.code)

    @staticmethod
    def _event(rid: str, key: KeyName, kid: str, outcome: str, reason: str = _REASON) -> AuditEvent:
        return AuditEvent(
            time=time.time(),
            request_id=rid,
            peer=Peer(pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), unit=None),
            operation="destroy",
            outcome=outcome,
            tenant=key.tenant,
            key=str(key),
            kid=kid,
            reason=reason,
        )
