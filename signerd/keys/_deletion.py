"""Destroy with a waiting period: a retired version is scheduled for deletion
(``pending_deletion``, with ``deletion_at`` = now + ``keys.deletion_wait``),
can be put back (``cancel``), and is destroyed by the daemon when the time
comes (``due`` and ``destroy_due``, called by the daemon's periodic task in one
process). An immediate destroy (``now``) needs the kid as confirmation, as
before, and a retired or pending_deletion version.

A version pending deletion is disabled: it never signs (only the active version
does) and verify refuses its kid with ``retired_kid``, as for a retired one.

Several daemons on one store may find the same version due: ``destroy_due``
re-reads the key under the admin lock and skips a version no longer due, and
the backends treat a destroy of a destroyed version as done.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from ..backends import Backend, DeletionScheduler, Destroyer, KeyInfo, VersionState
from ..errors import ConfirmationRequired, NotSupported
from ..wire import KeyName
from ._lifecycle import require

__all__ = ["Deletions"]

Change = Callable[[KeyName, Callable[[Backend], KeyInfo]], Awaitable[KeyInfo]]
#: runs under the admin lock with the kid about to be destroyed when due (its audit record)
BeforeDestroy = Callable[[str], Awaitable[None]]

_DESTROYABLE = {VersionState.RETIRED, VersionState.PENDING_DELETION}


def _scheduler(backend: Backend) -> DeletionScheduler:
    if not isinstance(backend, DeletionScheduler):
        raise NotSupported("this backend cannot schedule deletions")
    return backend


def _destroyer(backend: Backend) -> Destroyer:
    if not isinstance(backend, Destroyer):
        raise NotSupported("this backend cannot destroy key versions")
    return backend


@dataclass
class Deletions:
    """The key service's deletions; each call holds the key's admin lock."""

    admin: Callable[[KeyName], contextlib.AbstractAsyncContextManager[None]]
    describe: Callable[[KeyName], Awaitable[KeyInfo]]
    change: Change  # a logged backend change whose result is stored in the cache
    wait: float  # keys.deletion_wait

    async def destroy(self, key: KeyName, version: int, confirm: str | None, now: bool) -> KeyInfo:
        """Schedule the deletion of a retired version, or with ``now`` destroy a retired or
        pending_deletion version at once (``confirm`` must then be its kid; when given
        without ``now`` it must be the kid too)."""
        kid = key.kid(version)
        if (now or confirm is not None) and confirm != kid:
            raise ConfirmationRequired()
        async with self.admin(key):
            current = await self.describe(key)
            if now:
                require(current, version, _DESTROYABLE, "only a retired version can be destroyed")
                return await self.change(key, lambda b: _destroyer(b).destroy(key, version))
            require(
                current,
                version,
                {VersionState.RETIRED},
                "only a retired version can be scheduled for deletion",
            )
            at = int(time.time() + self.wait)
            return await self.change(
                key, lambda b: _scheduler(b).schedule_deletion(key, version, at)
            )

    async def cancel(self, key: KeyName, version: int) -> KeyInfo:
        """Put a pending_deletion version back to retired."""
        async with self.admin(key):
            current = await self.describe(key)
            require(
                current,
                version,
                {VersionState.PENDING_DELETION},
                "only a version pending deletion can have its deletion cancelled",
            )
            return await self.change(key, lambda b: _scheduler(b).cancel_deletion(key, version))

    @staticmethod
    def due(keys: Iterable[KeyInfo], now: float) -> list[tuple[KeyName, int]]:
        """The versions pending deletion whose time has come, by what ``keys`` say."""
        return [
            (info.key, v.version)
            for info in keys
            for v in info.versions
            if v.state is VersionState.PENDING_DELETION
            and v.deletion_at is not None
            and v.deletion_at <= now
        ]

    async def destroy_due(
        self, key: KeyName, version: int, before: BeforeDestroy
    ) -> KeyInfo | None:
        """Destroy a version whose deletion is due, read again under the admin lock; None
        when it is not due any more (cancelled, destroyed by another daemon). ``before``
        runs first (it may raise: nothing is destroyed)."""
        async with self.admin(key):
            v = (await self.describe(key)).version(version)
            if (
                v is None
                or v.state is not VersionState.PENDING_DELETION
                or v.deletion_at is None
                or v.deletion_at > time.time()
            ):
                return None
            await before(v.kid)
            return await self.change(key, lambda b: _destroyer(b).destroy(key, version))
