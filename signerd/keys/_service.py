"""The key service: one keyring over one or more backends, for the server.

It runs backend calls in an executor per backend (``_executors``), caches
each kid's public key (``_keyring``: a kid's key never changes, so verify
never needs a backend round trip), decides which state changes are allowed,
checks every signature against the public key before it leaves, and
coalesces concurrent sign requests into batch calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, TypeVar

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature

from ..backends import Backend, KeyInfo, KeyVersion, VersionState
from ..errors import (
    BackendUnavailable,
    DestroyedKid,
    InvalidSignature,
    InvalidState,
    KeyExists,
    RetiredKid,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ..wire import KeyName
from ._coalesce import Coalescer
from ._deletion import Deletions
from ._executors import Executors
from ._keyring import Entry, Keyring
from ._lifecycle import logged_changes, require, retire_call
from ._notices import Notices
from ._periodic import refresh_periodically
from ._settings import Settings
from ._verifier import checked_signatures

if TYPE_CHECKING:
    from ..workers import StallGuard

log = logging.getLogger("signerd.keys")
_T = TypeVar("_T")
Before = Callable[[str], object]  # runs with the kid about to sign (an intent record)

#: seconds the first read of the whole keyring may take at start-up
STARTUP_TIMEOUT = 60.0

#: the keys whose admin lock the running task holds
_holding: contextvars.ContextVar[frozenset[KeyName]] = contextvars.ContextVar(
    "signerd_admin_holding", default=frozenset()
)

#: states whose kid verifies and is published in the JWKS
PUBLISHED = frozenset({VersionState.PENDING, VersionState.ACTIVE, VersionState.VERIFY_ONLY})


_Group = tuple[KeyName, int]


class KeyService:
    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        default_backend: str,
        tenant_backends: Mapping[str, str] | None = None,
        settings: Settings | None = None,
        admin_guard: Callable[[KeyName], contextlib.AbstractAsyncContextManager[None]]
        | None = None,
        stall_guard: StallGuard | None = None,
    ) -> None:
        self.settings = settings or Settings()
        self._calls = Executors(
            backends,
            default_backend=default_backend,
            tenant_backends=tenant_backends,
            timeout=self.settings.backend_timeout,
        )
        self.backend_name = self._calls.backend_name
        self._on = self._calls.on
        #: the cached keyring; its dicts are read here directly (the sign and verify paths)
        self._keyring = Keyring(
            self._calls.backends, self.settings, self._calls.run, self.backend_name
        )
        self._keys = self._keyring.keys
        self._change = logged_changes(self._calls.change, self._keys, self.backend_name)
        self._kids = self._keyring.kids
        self._store = self._keyring.store
        #: changes other workers announced; ``learn`` is what a notice calls
        self._notices = Notices(
            self._keyring, lambda key: self._on(key, lambda b: b.describe(key)), self.backend_name
        )
        self.learn = self._notices.learn
        self.counters = self._keyring.counters
        self._admin_locks: dict[KeyName, asyncio.Lock] = {}
        #: wraps every admin operation: the workers' cross-process lock and change notice
        self.admin_guard = admin_guard
        #: its ``observe`` hook times each batch (metrics); a caller waits backend_timeout
        s, wait = self.settings, self.settings.backend_timeout
        self.coalescer: Coalescer[_Group] = Coalescer(
            self._sign_batch, max_batch=s.max_batch, max_in_flight=s.max_in_flight, max_wait=wait
        )
        self._refresher: asyncio.Task[None] | None = None
        self._calls.stall_guard = stall_guard

        async def stored(key: KeyName, call: Callable[[Backend], KeyInfo]) -> KeyInfo:
            return self._store(await self._change(key, call))

        self.deletions = Deletions(self.admin, self.describe, stored, self.settings.deletion_wait)

    async def check_backend(self, name: str, timeout: float) -> None:
        """Raise unless backend ``name`` answers its health check within ``timeout``."""
        await self._calls.run(name, self._calls.backends[name].check, timeout)

    # --- lifecycle of the service -------------------------------------------

    async def start(
        self, bootstrap: Sequence[KeyName] = (), *, opened: Callable[[], object] = lambda: None
    ) -> None:
        """Open the backends, call ``opened``, read the keyrings, create ``bootstrap``."""
        await self._calls.open(timeout := max(STARTUP_TIMEOUT, self.settings.backend_timeout))
        opened()
        await self.refresh_all(timeout=timeout)
        for key in bootstrap:
            if key not in self._keys:
                try:
                    await self.create(key)
                    log.info("signerd.key_bootstrapped key=%s", key)
                except KeyExists:
                    await self.describe(key)
        if self.settings.refresh_interval > 0:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        s = self.settings
        await refresh_periodically(
            s.refresh_interval, self._calls.backends, self._calls.run, self._keyring.reread
        )

    async def refresh_all(self, timeout: float | None = None, only: str | None = None) -> None:
        """Re-read the keyring from every backend (or only the named one)."""
        await self._keyring.refresh_all(timeout, only)

    async def ready(self) -> None:
        """Raise unless every backend answers and every keyring reads consistently (the
        answer is reused for a second)."""
        await self._keyring.ready()

    async def close(self) -> None:
        tasks = self._keyring.tasks()
        if self._refresher is not None:
            tasks.append(self._refresher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.coalescer.aclose()
        await self._calls.close()
        self._keyring.log_counters()

    # --- reading ------------------------------------------------------------

    async def describe(self, key: KeyName) -> KeyInfo:
        """Read a known key from its backend and update the cache (``Keyring.describe``)."""
        return await self._keyring.describe(key)

    def backend_of(self, key: KeyName) -> tuple[str, Backend]:
        """The name and the backend that hold ``key`` (by its tenant's route)."""
        name = self.backend_name(key.tenant)
        return name, self._calls.backends[name]

    def remap(self, default_backend: str, tenant_backends: Mapping[str, str]) -> None:
        """Route tenants anew (ValueError: a backend not here); a moved tenant's keys leave
        the cache and its new backend is re-read in the background."""
        for name in self._keyring.rehome(self._calls.remap(default_backend, tenant_backends)):
            self._keyring.background(self.refresh_all(only=name))

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def cached(self) -> list[KeyInfo]:
        """Every key in the cache, by name (no backend call)."""
        return [info for _, info in sorted(self._keys.items())]

    async def list_keys(self, tenant: str | None = None) -> list[KeyInfo]:
        await self.refresh_all(only=None if tenant is None else self.backend_name(tenant))
        return [
            info
            for key, info in sorted(self._keys.items())
            if tenant is None or key.tenant == tenant
        ]

    def published(self, tenant: str | None = None) -> list[KeyVersion]:
        """Versions whose public keys are published (pending, active, verify-only), from the cache."""
        return [
            e.version
            for e in sorted(self._kids.values(), key=lambda e: (e.key, e.version.version))
            if e.version.state in PUBLISHED and (tenant is None or e.key.tenant == tenant)
        ]

    async def lookup_kid(self, kid: str) -> tuple[KeyName, KeyVersion]:
        entry = await self._entry(kid)
        return entry.key, entry.version

    async def _entry(self, kid: str) -> Entry:
        entry = self._kids.get(kid)
        return entry if entry is not None else await self._keyring.entry(kid)

    # --- signing and verifying ----------------------------------------------

    async def sign(
        self, key: KeyName, data: bytes, before: Before | None = None, gather: bool = True
    ) -> tuple[str, bytes]:
        """Sign with the active version (coalesced with concurrent signs of that version);
        ``before(kid)`` runs before each attempt with ``kid`` (an intent record; may raise).
        ``gather``: other requests may join this one's batch (``Coalescer.submit``)."""
        return await self._with_active(
            key, lambda version: self.coalescer.submit((key, version), data, gather), before
        )

    async def sign_many(
        self, key: KeyName, datas: Sequence[bytes]
    ) -> tuple[str, list[bytes | SignerdError]]:
        """Sign several payloads with the active version: a batch request's items for one
        key, in backend calls of ``max_batch`` items (no per-item coalescing), each result
        checked. The caller writes the audit record before the signatures leave."""

        async def run(version: int) -> list[bytes | SignerdError]:
            step = self.settings.max_batch
            out: list[bytes | SignerdError] = []
            for at in range(0, len(datas), step):
                out += await self._sign_batch((key, version), datas[at : at + step])
            return out

        return await self._with_active(key, run)

    async def _with_active(
        self, key: KeyName, sign: Callable[[int], Awaitable[_T]], before: Before | None = None
    ) -> tuple[str, _T]:
        """``sign(version)`` with the active version; after another daemon rotated or retired
        under us (InvalidState, UnknownVersion), learn the keyring again and retry once."""
        info = self._keys.get(key)
        if info is None or key in self._notices:
            info = await self._notices.current(key)
        active = info.active
        if active is None:
            raise InvalidState("key has no active version")
        if before:
            before(active.kid)
        try:
            return active.kid, await sign(active.version)
        except (InvalidState, UnknownVersion) as exc:
            fresh = (await self.describe(key)).active
            if (
                fresh is not None
                and fresh.version == active.version
                and (isinstance(exc, UnknownVersion))
            ):
                # The active version is still listed but its key cannot be found:
                # the token is not reading well, which is not the caller's 404.
                log.error("signerd.active_key_unreadable kid=%s", active.kid)
                raise BackendUnavailable("the active version cannot be read now") from exc
            if fresh is None or fresh.version == active.version:
                raise
            if before is not None:
                before(fresh.kid)
            return fresh.kid, await sign(fresh.version)

    async def _sign_batch(
        self, group: _Group, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        key, version = group
        entry = self._kids.get(key.kid(version))
        if entry is None:  # forgotten by a refresh meanwhile; sign() re-reads and retries
            raise UnknownVersion()

        def checked(results: list[bytes | SignerdError]) -> list[bytes | SignerdError]:
            return checked_signatures(entry.public, entry.version.kid, items, results)

        signed = await self._calls.sign_on_loop(key, version, items)  # None: not this way
        if signed is not None:
            return checked(signed)
        return await self._on(key, lambda b: checked(b.sign(key, version, items)), on_loop=True)

    async def verify(self, kid: str, data: bytes, signature: bytes) -> tuple[KeyName, KeyVersion]:
        """Return the key and version when the signature is valid; raise otherwise."""
        entry = await self._entry(kid)
        if entry.key in self._notices:  # changed by another worker, not read here yet
            with contextlib.suppress(SignerdError):  # unreadable: the cache answers
                await self._notices.current(entry.key)
            entry = await self._entry(kid)
        state = entry.version.state
        if state is VersionState.RETIRED or state is VersionState.PENDING_DELETION:
            raise RetiredKid()  # pending deletion is disabled, as retired
        if state is VersionState.DESTROYED:
            raise DestroyedKid()
        try:
            entry.public.verify(signature, data)
        except _CryptoInvalidSignature as exc:
            raise InvalidSignature() from exc
        return entry.key, entry.version

    # --- administration -----------------------------------------------------

    @contextlib.asynccontextmanager
    async def admin(self, key: KeyName) -> AsyncIterator[None]:
        """Hold ``key``'s admin lock (and the workers' one) for the block; the operations
        below, called inside it, take it again without waiting."""
        held = _holding.get()
        if key in held:  # this task holds it already (``admin``)
            yield
            return
        async with self._admin_locks.setdefault(key, asyncio.Lock()):
            token = _holding.set(held | {key})
            try:
                if self.admin_guard is None:
                    yield
                else:
                    async with self.admin_guard(key):
                        yield
            finally:
                _holding.reset(token)

    async def read(self, key: KeyName) -> KeyInfo | None:
        """``key`` from the cache, else one lookup in its backend (no re-read); None if absent."""
        if (info := self._keys.get(key)) is not None:
            return info
        ticket = self._keyring.ticket()  # taken before the read (``Keyring.store``)
        try:
            return self._store(await self._on(key, lambda b: b.describe(key)), ticket)
        except UnknownKey:
            return None

    async def create(self, key: KeyName) -> KeyInfo:
        async with self.admin(key):
            return self._store(await self._change(key, lambda b: b.create(key)))

    async def rotate(self, key: KeyName, *, pending: bool = False) -> tuple[KeyInfo, KeyVersion]:
        async with self.admin(key):
            info = self._store(await self._change(key, lambda b: b.rotate(key, pending=pending)))
            made = info.made or info.latest  # not a version another daemon made meanwhile
            info = await self._apply_retention(info)
            return info, info.version(made) or info.versions[-1]

    async def promote(self, key: KeyName, version: int) -> KeyInfo:
        async with self.admin(key):
            current = await self.describe(key)
            require(
                current, version, {VersionState.PENDING}, "only a pending version can be promoted"
            )
            info = self._store(
                await self._change(key, lambda b: b.set_state(key, version, VersionState.ACTIVE))
            )
            return await self._apply_retention(info)

    async def retire(self, key: KeyName, version: int) -> KeyInfo:
        async with self.admin(key):
            current = await self.describe(key)
            allowed = {VersionState.PENDING, VersionState.VERIFY_ONLY}
            require(
                current, version, allowed, "only a pending or verify-only version can be retired"
            )
            return self._store(
                await self._change(key, lambda b: b.set_state(key, version, VersionState.RETIRED))
            )

    async def destroy(
        self, key: KeyName, version: int, confirm: str | None, *, now: bool = False
    ) -> KeyInfo:
        """Schedule a retired version's deletion; ``now``: destroy at once (``_deletion``)."""
        return await self.deletions.destroy(key, version, confirm, now)

    async def cancel_deletion(self, key: KeyName, version: int) -> KeyInfo:
        return await self.deletions.cancel(key, version)

    async def _apply_retention(self, info: KeyInfo) -> KeyInfo:
        keep = self.settings.retain_verify_only
        if keep <= 0:
            return info
        key = info.key
        verify_only = [v.version for v in info.versions if v.state is VersionState.VERIFY_ONLY]
        for number in verify_only[: max(0, len(verify_only) - keep)]:
            log.info("signerd.retention_retire kid=%s", key.kid(number))
            info = self._store(await self._change(key, retire_call(key, number)))
        return info
