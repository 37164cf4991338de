"""The key service: one keyring over one or more backends, for the server.

It owns an executor per backend (backends block; the event loop never waits
on one, except for an ``Inline`` backend's signatures in a worker, which run
on the loop's thread under the worker's ``StallGuard``),
caches each kid's public key (a kid's key never changes, so verify never
needs a backend round trip), decides which state changes are allowed, checks
every signature against the public key before it leaves, and coalesces
concurrent sign requests into batch calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..backends import Backend, Destroyer, Inline, KeyInfo, KeyVersion, VersionState
from ..errors import (
    BackendError,
    BackendUnavailable,
    ConfirmationRequired,
    DestroyedKid,
    InvalidSignature,
    InvalidState,
    KeyExists,
    NotSupported,
    RetiredKid,
    SignerdError,
    UnknownKey,
    UnknownKid,
    UnknownVersion,
)
from ..server._idempotency import run_change
from ..wire._names import KeyName, parse_kid
from ._coalesce import Coalescer
from ._keyring import KeyringUpkeep

if TYPE_CHECKING:
    from ..workers import StallGuard

log = logging.getLogger("signerd.keys")
_T = TypeVar("_T")

#: seconds the first read of the whole keyring may take at start-up
STARTUP_TIMEOUT = 60.0

#: the keys whose admin lock the running task holds
_holding: contextvars.ContextVar[frozenset[KeyName]] = contextvars.ContextVar(
    "signerd_admin_holding", default=frozenset()
)

#: states whose kid verifies and is published in the JWKS
PUBLISHED = frozenset({VersionState.PENDING, VersionState.ACTIVE, VersionState.VERIFY_ONLY})


@dataclass(frozen=True)
class Settings:
    backend_timeout: float = 5.0  # seconds a backend call may take before 503
    max_batch: int = 64  # items per coalesced backend sign call
    max_in_flight: int = 2  # concurrent batches per key version
    refresh_interval: float = 30.0  # seconds between keyring re-reads (0: never)
    unknown_kid_refresh: float = 1.0  # at most one re-read per key per this many seconds
    retain_verify_only: int = 0  # keep this many verify-only versions, retire older (0: all)
    idempotency_ttl: float = 86400.0  # seconds an admin request's Idempotency-Key is kept
    idempotency_max_entries: int = 1000  # Idempotency-Keys kept at most (the oldest go)


@dataclass(frozen=True)
class _Entry:
    key: KeyName
    version: KeyVersion
    public: Ed25519PublicKey


_Group = tuple[KeyName, int]


class KeyService(KeyringUpkeep):
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
        if default_backend not in backends:
            raise ValueError(f"default backend {default_backend!r} is not configured")
        self._backends = dict(backends)
        self._default = default_backend
        self._routes = dict(tenant_backends or {})
        self.settings = settings or Settings()
        self._executors = {
            name: ThreadPoolExecutor(
                max_workers=b.max_concurrency, thread_name_prefix=f"signerd-{name}"
            )
            for name, b in self._backends.items()
        }
        self._keys: dict[KeyName, KeyInfo] = {}
        self._kids: dict[str, _Entry] = {}
        self._refreshed: dict[KeyName, float] = {}
        self._init_upkeep()
        self._admin_locks: dict[KeyName, asyncio.Lock] = {}
        #: wraps every admin operation: the workers' cross-process lock and change notice
        self.admin_guard = admin_guard
        self._coalescer: Coalescer[_Group] = Coalescer(
            self._sign_batch,
            max_batch=self.settings.max_batch,
            max_in_flight=self.settings.max_in_flight,
        )
        self._refresher: asyncio.Task[None] | None = None
        self._inline = {n: b for n, b in self._backends.items() if isinstance(b, Inline)}
        #: a worker's guard: ``Inline`` backends sign on the loop's thread under it
        self.stall_guard = stall_guard

    # --- plumbing ---------------------------------------------------------

    def backend_name(self, tenant: str) -> str:
        return self._routes.get(tenant, self._default)

    async def _run(self, backend: str, fn: Callable[[], _T], timeout: float | None = None) -> _T:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout or self.settings.backend_timeout):
                return await loop.run_in_executor(self._executors[backend], fn)
        except TimeoutError as exc:
            log.error("signerd.backend_timeout backend=%s", backend)
            raise BackendUnavailable("the key backend did not answer in time") from exc

    async def _change(self, key: KeyName, call: Callable[[Backend], _T]) -> _T:
        """``call(backend)``, a keyring change, for ``key``'s backend (``run_change``)."""
        name = self.backend_name(key.tenant)
        backend, timeout = self._backends[name], self.settings.backend_timeout
        return await run_change(self._executors[name], lambda: call(backend), timeout)

    async def _on(
        self, key: KeyName, call: Callable[[Backend], _T], *, on_loop: bool = False
    ) -> _T:
        """``call(backend)`` for ``key``'s backend, in its executor; with ``on_loop`` (signing),
        on this thread under the worker's ``StallGuard`` when the backend is ``Inline`` and
        no other thread is in its library."""
        name = self.backend_name(key.tenant)
        backend = self._backends[name]
        inline, guard = self._inline.get(name), self.stall_guard
        if on_loop and inline is not None and guard is not None and inline.try_enter():
            try:
                return guard.call(
                    lambda: call(backend),
                    self.settings.backend_timeout,
                    "token",
                    BackendUnavailable,
                )
            finally:
                inline.leave()
        return await self._run(name, lambda: call(backend))

    def _store(self, info: KeyInfo) -> KeyInfo:
        old = self._keys.get(info.key)
        self._keys[info.key] = info
        self._refreshed[info.key] = time.monotonic()
        if old is not None:
            for v in old.versions:
                self._kids.pop(v.kid, None)
        for v in info.versions:
            self._kids[v.kid] = _Entry(
                info.key, v, Ed25519PublicKey.from_public_bytes(v.public_key)
            )
        return info

    def _forget(self, key: KeyName) -> None:
        self._refreshed.pop(key, None)
        old = self._keys.pop(key, None)
        if old is not None:
            for v in old.versions:
                self._kids.pop(v.kid, None)

    # --- lifecycle of the service -------------------------------------------

    async def start(self, bootstrap: Sequence[KeyName] = ()) -> None:
        # Reading a large keyring the first time may take longer than one request may.
        await self.refresh_all(timeout=max(STARTUP_TIMEOUT, self.settings.backend_timeout))
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
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await self.refresh_all()
            except SignerdError as exc:
                log.warning("signerd.refresh_failed code=%s", exc.code)

    async def refresh_all(self, timeout: float | None = None, only: str | None = None) -> None:
        """Re-read the keyring from every backend (or only the named one)."""
        for name in self._backends:
            if only is None or name == only:
                await self._reread(name, timeout)

    async def close(self) -> None:
        tasks = self._upkeep_tasks()
        if self._refresher is not None:
            tasks.append(self._refresher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._coalescer.aclose()
        for name, backend in self._backends.items():
            try:
                await self._run(name, backend.close)
            except SignerdError:
                log.warning("signerd.backend_close_failed backend=%s", name)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)
        self._log_counters()

    # --- reading ------------------------------------------------------------

    async def describe(self, key: KeyName) -> KeyInfo:
        """Read a known key from its backend (the store is the truth) and update the cache.

        A name not in the cache waits for the shared re-read (no search per
        request). A known key the backend no longer finds is forgotten only
        when a careful re-read of the keyring proves it gone.
        """
        if key not in self._keys:
            return await self._cached(key)
        self.counters.key_reads += 1
        try:
            return self._store(await self._on(key, lambda b: b.describe(key)))
        except UnknownKey:
            name = self.backend_name(key.tenant)
            if name in self._suspects:
                raise BackendUnavailable("the keyring is being re-read") from None
            await self._reread(name)
            info = self._keys.get(key)
            if info is None:
                raise
            return info

    @property
    def key_count(self) -> int:
        """Keys in the cache (no backend call)."""
        return len(self._keys)

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

    async def _entry(self, kid: str) -> _Entry:
        entry = self._kids.get(kid)
        if entry is not None:
            return entry
        key, _ = parse_kid(kid)
        now = time.monotonic()
        if key in self._keys:
            # A new version of a key we know: at most one read of it per interval.
            if now - self._refreshed.get(key, 0.0) >= self.settings.unknown_kid_refresh:
                self._refreshed[key] = now
                with contextlib.suppress(UnknownKey):
                    await self.describe(key)
        else:
            # Kids of keys we do not know wait for the shared re-read.
            with contextlib.suppress(UnknownKey):
                await self._cached(key)
        entry = self._kids.get(kid)
        if entry is None:
            raise UnknownKid()
        return entry

    # --- signing and verifying ----------------------------------------------

    async def sign(self, key: KeyName, data: bytes) -> tuple[str, bytes]:
        """Sign with the active version (coalesced with concurrent signs of that version)."""
        return await self._with_active(
            key, lambda version: self._coalescer.submit((key, version), data)
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
        self, key: KeyName, sign: Callable[[int], Awaitable[_T]]
    ) -> tuple[str, _T]:
        """``sign(version)`` with the active version; after another daemon rotated or retired
        under us (InvalidState, UnknownVersion), learn the keyring again and retry once."""
        info = await self._cached(key)
        active = info.active
        if active is None:
            raise InvalidState("key has no active version")
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
            return fresh.kid, await sign(fresh.version)

    async def _sign_batch(
        self, group: _Group, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        key, version = group
        entry = self._kids.get(key.kid(version))
        if entry is None:  # forgotten by a refresh meanwhile; sign() re-reads and retries
            raise UnknownVersion()

        def run(backend: Backend) -> list[bytes | SignerdError]:
            results = backend.sign(key, version, items)
            checked: list[bytes | SignerdError] = []
            for data, result in zip(items, results, strict=True):
                if isinstance(result, bytes):
                    try:
                        entry.public.verify(result, data)
                    except _CryptoInvalidSignature:
                        log.error("signerd.signature_check_failed kid=%s", entry.version.kid)
                        result = BackendError(
                            "the backend produced a signature that does not verify"
                        )
                checked.append(result)
            return checked

        return await self._on(key, run, on_loop=True)

    async def verify(self, kid: str, data: bytes, signature: bytes) -> tuple[KeyName, KeyVersion]:
        """Return the key and version when the signature is valid; raise otherwise."""
        entry = await self._entry(kid)
        state = entry.version.state
        if state is VersionState.RETIRED:
            raise RetiredKid()
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
        try:
            return self._keys.get(key) or self._store(
                await self._on(key, lambda b: b.describe(key))
            )
        except UnknownKey:
            return None

    async def learn(self, key: KeyName) -> None:
        """Another process changed ``key``: read it from its backend now.

        A key this process does not know yet (created elsewhere) is read and
        cached; one the backend no longer finds is left to a careful re-read.
        """
        async with self._admin_locks.setdefault(key, asyncio.Lock()):
            try:
                self._store(await self._on(key, lambda b: b.describe(key)))
            except UnknownKey:
                if key in self._keys:
                    await self._reread(self.backend_name(key.tenant))

    async def create(self, key: KeyName) -> KeyInfo:
        async with self.admin(key):
            return self._store(await self._change(key, lambda b: b.create(key)))

    async def rotate(self, key: KeyName, *, pending: bool = False) -> tuple[KeyInfo, KeyVersion]:
        async with self.admin(key):
            info = self._store(await self._change(key, lambda b: b.rotate(key, pending=pending)))
            info = await self._apply_retention(info)
            return info, info.versions[-1]

    async def promote(self, key: KeyName, version: int) -> KeyInfo:
        async with self.admin(key):
            current = await self.describe(key)
            _require(
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
            _require(
                current, version, allowed, "only a pending or verify-only version can be retired"
            )
            return self._store(
                await self._change(key, lambda b: b.set_state(key, version, VersionState.RETIRED))
            )

    async def destroy(self, key: KeyName, version: int, confirm: str | None) -> KeyInfo:
        if confirm != key.kid(version):
            raise ConfirmationRequired()
        async with self.admin(key):
            current = await self.describe(key)
            _require(
                current, version, {VersionState.RETIRED}, "only a retired version can be destroyed"
            )

            def run(backend: Backend) -> KeyInfo:
                if not isinstance(backend, Destroyer):
                    raise NotSupported("this backend cannot destroy key versions")
                return backend.destroy(key, version)

            return self._store(await self._change(key, run))

    async def _apply_retention(self, info: KeyInfo) -> KeyInfo:
        keep = self.settings.retain_verify_only
        if keep <= 0:
            return info
        key = info.key
        verify_only = [v.version for v in info.versions if v.state is VersionState.VERIFY_ONLY]
        for number in verify_only[: max(0, len(verify_only) - keep)]:
            log.info("signerd.retention_retire kid=%s", key.kid(number))
            info = self._store(await self._change(key, _retire_call(key, number)))
        return info


def _retire_call(key: KeyName, version: int) -> Callable[[Backend], KeyInfo]:
    return lambda backend: backend.set_state(key, version, VersionState.RETIRED)


def _require(info: KeyInfo, version: int, states: set[VersionState], message: str) -> KeyVersion:
    found = info.version(version)
    if found is None:
        raise UnknownVersion()
    if found.state not in states:
        raise InvalidState(message)
    return found
