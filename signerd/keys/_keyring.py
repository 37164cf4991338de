"""Keeping the key service's cached keyring true to its store.

The key service answers from a cache (a kid's public key never changes). The
``Keyring`` holds that cache and keeps it honest without letting an error or a
caller empty it:

* a listing that lacks keys we know is suspect: the backend starts again
  (PKCS#11: library re-initialised, new login) and is read again, and keys
  still missing are forgotten only when the backend proves them gone
  (``Recoverable.confirm_absent``). Otherwise the cache is kept, the backend
  is marked suspect (not ready, 503) and re-read in the background until a
  read is consistent;
* names and kids the cache does not know wait for one shared re-read, at
  most one per ``unknown_kid_refresh`` seconds, never a search per request;
* readiness answers are reused for READY_TTL seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ..backends import Backend, KeyInfo, KeyVersion, Recoverable
from ..errors import BackendUnavailable, SignerdError, UnknownKey, UnknownKid
from ..wire import KeyName, parse_kid
from ._settings import Settings
from ._verifier import Verifier, verifier

log = logging.getLogger("signerd.keys")
_T = TypeVar("_T")

#: seconds a readiness answer is reused (so /v1/ready is not a token round trip per call)
READY_TTL = 1.0

#: seconds between attempts to re-read a keyring that could not be read consistently
HEAL_FIRST, HEAL_MAX = 0.5, 10.0


@dataclass
class Counters:
    """Backend reads made by the key service (logged at close; read by tests)."""

    keyring_reads: int = 0  # whole-keyring listings
    key_reads: int = 0  # single-key reads (describe)
    shared_rereads: int = 0  # listings made for unknown names or kids, shared by all asking
    recoveries: int = 0  # listings that lacked known keys (recover, read again)
    ready_checks: int = 0  # readiness round trips (answers are reused for READY_TTL)
    forgotten: list[str] = field(default_factory=list)  # keys proven gone


@dataclass(frozen=True)
class Entry:
    """A cached kid: its key, its version and its public key."""

    key: KeyName
    version: KeyVersion
    public: Verifier  # checks signatures (``_verifier``)


class Run(Protocol):
    """``fn()`` in the named backend's executor, within ``timeout`` (None: the backend timeout)."""

    def __call__(
        self, backend: str, fn: Callable[[], _T], timeout: float | None = None, /
    ) -> Awaitable[_T]: ...


class Keyring:
    """The keys and kids of every backend, cached; their re-reads, recovery and readiness.

    ``run`` calls a backend (in its executor); ``route`` names the backend of a tenant.
    ``keys`` and ``kids`` are the cache, read directly by the key service.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        settings: Settings,
        run: Run,
        route: Callable[[str], str],
    ) -> None:
        self._backends = backends
        self._settings = settings
        self._run = run
        self._route = route
        self.keys: dict[KeyName, KeyInfo] = {}
        self.kids: dict[str, Entry] = {}
        #: when an unknown kid last made each known key be read (the cache's own
        #: re-reads do not count: a version made elsewhere since is found at once)
        self._kid_lookups: dict[KeyName, float] = {}
        self._tickets = 0  # reads of a key are stored in the order they started
        self._stored_at: dict[KeyName, int] = {}
        self.counters = Counters()
        self._reread_locks: dict[str, asyncio.Lock] = {}
        self._next_reread: dict[str, asyncio.Task[None]] = {}  # a shared re-read not started yet
        self._last_shared: dict[str, float] = {}
        self._suspects: set[str] = set()  # backends whose keyring could not be read consistently
        self._healers: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._ready_task: asyncio.Task[None] | None = None
        self._ready_at = 0.0

    # --- the cache ----------------------------------------------------------

    def ticket(self) -> int:
        """A number for a read of a key about to start: ``store(info, ticket)`` keeps it
        only if nothing read later was stored first."""
        self._tickets += 1
        return self._tickets

    def store(self, info: KeyInfo, ticket: int | None = None) -> KeyInfo:
        """Cache ``info``; an older read (``ticket`` below the stored one's) is dropped."""
        ticket = self.ticket() if ticket is None else ticket
        if ticket < self._stored_at.get(info.key, 0):
            return self.keys.get(info.key, info)
        self._stored_at[info.key] = ticket
        old = self.keys.get(info.key)
        self.keys[info.key] = info
        if old is not None:
            for v in old.versions:
                self.kids.pop(v.kid, None)
        for v in info.versions:
            self.kids[v.kid] = Entry(info.key, v, verifier(v.public_key))
        return info

    def forget(self, key: KeyName) -> None:
        self._kid_lookups.pop(key, None)
        old = self.keys.pop(key, None)
        if old is not None:
            for v in old.versions:
                self.kids.pop(v.kid, None)

    def rehome(self, moved: Callable[[str], bool]) -> set[str]:
        """Forget every cached key of a tenant that ``moved`` to another backend (it is never
        served from its old domain); the backends those tenants are routed to now."""
        gone = [key for key in self.keys if moved(key.tenant)]
        for key in gone:
            self.forget(key)
        return {self._route(key.tenant) for key in gone}

    async def describe(self, key: KeyName) -> KeyInfo:
        """Read a known key from its backend (the store is the truth) and update the cache.

        A name not in the cache waits for the shared re-read (no search per
        request). A known key the backend no longer finds is forgotten only
        when a careful re-read of the keyring proves it gone.
        """
        if key not in self.keys:
            return await self.cached(key)
        self.counters.key_reads += 1
        name = self._route(key.tenant)
        backend = self._backends[name]
        ticket = self.ticket()  # taken before the read: a read that started later wins
        try:
            return self.store(await self._run(name, lambda: backend.describe(key)), ticket)
        except UnknownKey:
            if name in self._suspects:
                raise BackendUnavailable("the keyring is being re-read") from None
            await self.reread(name)
            info = self.keys.get(key)
            if info is None:
                raise
            return info

    async def entry(self, kid: str) -> Entry:
        """The cached kid; a kid not cached yet is looked for at most once per interval."""
        entry = self.kids.get(kid)
        if entry is not None:
            return entry
        key, _ = parse_kid(kid)
        now = time.monotonic()
        if key in self.keys:
            # A new version of a key we know: at most one read of it per interval.
            if now - self._kid_lookups.get(key, -math.inf) >= self._settings.unknown_kid_refresh:
                self._kid_lookups[key] = now
                with contextlib.suppress(UnknownKey):
                    await self.describe(key)
        else:
            # Kids of keys we do not know wait for the shared re-read.
            with contextlib.suppress(UnknownKey):
                await self.cached(key)
        entry = self.kids.get(kid)
        if entry is None:
            raise UnknownKid()
        return entry

    async def cached(self, key: KeyName) -> KeyInfo:
        """The key from the cache; an unknown name waits for the next shared re-read."""
        info = self.keys.get(key)
        if info is None:
            await self._shared_reread(self._route(key.tenant))
            info = self.keys.get(key)
            if info is None:
                raise UnknownKey()
        return info

    # --- re-reads -----------------------------------------------------------

    async def refresh_all(self, timeout: float | None = None, only: str | None = None) -> None:
        """Re-read the keyring from every backend (or only the named one), side by side: a
        backend that hangs delays no other's re-read. The first failure is raised."""
        names = [name for name in self._backends if only is None or name == only]
        results = await asyncio.gather(
            *(self.reread(name, timeout) for name in names), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def reread(self, name: str, timeout: float | None = None) -> None:
        """Re-read one backend's keyring; never forget a key on an error's word.

        A listing that lacks keys we know is suspect: the backend starts again
        (PKCS#11: library re-initialised, new login) and is read again; keys
        still missing are forgotten only when the backend proves them gone.
        Otherwise the cache is kept, the backend is marked suspect (not ready)
        and BackendUnavailable raised; a background task keeps re-reading.
        """
        async with self._reread_locks.setdefault(name, asyncio.Lock()):
            backend = self._backends[name]
            gone: frozenset[KeyName] = frozenset()
            try:
                ticket, listed = await self._listing(name, timeout)
                missing = self._known(name) - listed.keys()
                if missing:
                    self.counters.recoveries += 1
                    log.warning(
                        "signerd.keyring_suspect backend=%s missing=%d listed=%d",
                        *(name, len(missing), len(listed)),
                    )
                    if isinstance(backend, Recoverable):
                        await self._run(name, backend.recover, timeout)
                    ticket, listed = await self._listing(name, timeout)
                    missing = self._known(name) - listed.keys()
                if missing:
                    known = [self.keys[k] for k in sorted(missing)]
                    gone = await self._run(
                        name, lambda: _confirm_absent(backend, known, sorted(listed)), timeout
                    )
            except SignerdError:
                self._mark_suspect(name)
                raise
            for info in listed.values():
                if self._route(info.key.tenant) == name:  # not moved meanwhile (``rehome``)
                    self.store(info, ticket)
            for key in sorted(gone):
                log.warning("signerd.key_gone key=%s backend=%s", key, name)
                self.counters.forgotten.append(str(key))
                self.forget(key)
            if missing - gone:
                self._mark_suspect(name)
                raise BackendUnavailable("the keyring could not be read consistently")
            if name in self._suspects:
                self._suspects.discard(name)
                log.warning("signerd.keyring_recovered backend=%s keys=%d", name, len(listed))

    async def _listing(
        self, name: str, timeout: float | None
    ) -> tuple[int, dict[KeyName, KeyInfo]]:
        """The keyring, with a ticket taken before it is read: a key read after the listing
        started and stored first is not overwritten by it (``store``)."""
        self.counters.keyring_reads += 1
        ticket = self.ticket()
        infos = await self._run(name, self._backends[name].list_keys, timeout)
        return ticket, {i.key: i for i in infos if self._route(i.key.tenant) == name}

    def _known(self, name: str) -> set[KeyName]:
        return {k for k in self.keys if self._route(k.tenant) == name}

    def _mark_suspect(self, name: str) -> None:
        if name not in self._suspects:
            self._suspects.add(name)
            log.error("signerd.keyring_kept backend=%s keys=%d", name, len(self._known(name)))
        healer = self._healers.get(name)
        if healer is None or healer.done():
            self._healers[name] = _spawn(self._heal(name))

    async def _heal(self, name: str) -> None:
        delay = HEAL_FIRST
        while name in self._suspects:
            await asyncio.sleep(delay)
            delay = min(delay * 2, HEAL_MAX)
            try:
                await self.reread(name)
            except SignerdError as exc:
                log.info("signerd.keyring_still_suspect backend=%s code=%s", name, exc.code)

    async def _shared_reread(self, name: str) -> None:
        """Wait for a re-read of the keyring that starts after this call.

        At most one starts per ``unknown_kid_refresh`` seconds, shared by every
        caller waiting for it: a stream of made-up key names or kids costs the
        backend one listing per interval, never one search per request.
        """
        task = self._next_reread.get(name)
        if task is None:
            last = self._last_shared.get(name)
            now = time.monotonic()
            delay = (
                0.0 if last is None else max(0.0, last + self._settings.unknown_kid_refresh - now)
            )
            task = _spawn(self._scheduled_reread(name, delay))
            self._next_reread[name] = task
        await asyncio.shield(task)

    async def _scheduled_reread(self, name: str, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._next_reread.pop(name, None)  # callers from now on wait for the next one
        self._last_shared[name] = time.monotonic()
        self.counters.shared_rereads += 1
        await self.reread(name)

    # --- readiness and shutdown ---------------------------------------------

    async def ready(self) -> None:
        """Raise unless every backend answers and every keyring reads consistently.

        The answer is reused for READY_TTL seconds and shared by concurrent
        callers, so readiness probes cost at most one round trip per second.
        """
        task = self._ready_task
        if task is None or (task.done() and time.monotonic() - self._ready_at >= READY_TTL):
            self._ready_at = time.monotonic()
            task = self._ready_task = _spawn(self._check_ready())
        await asyncio.shield(task)

    async def _check_ready(self) -> None:
        self.counters.ready_checks += 1
        for name, backend in self._backends.items():
            if name in self._suspects:
                raise BackendUnavailable("the keyring is being re-read after a failed read")
            await self._run(name, backend.check)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` (a re-read) in the background; a failure is logged, not raised."""

        async def logged() -> None:
            try:
                await work
            except SignerdError as exc:
                log.warning("signerd.reread_failed code=%s", exc.code)

        task = _spawn(logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def tasks(self) -> list[asyncio.Task[None]]:
        """The background tasks (healing, re-reads, readiness), to cancel at close."""
        tasks = [*self._healers.values(), *self._next_reread.values(), *self._background]
        if self._ready_task is not None:
            tasks.append(self._ready_task)
        return tasks

    def log_counters(self) -> None:
        c = self.counters
        log.info(
            "signerd.keys.counters keyring_reads=%d key_reads=%d shared_rereads=%d "
            "recoveries=%d ready_checks=%d forgotten=%d",
            c.keyring_reads,
            c.key_reads,
            c.shared_rereads,
            c.recoveries,
            c.ready_checks,
            len(c.forgotten),
        )


def _spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(coro)
    task.add_done_callback(_consume)
    return task


def _consume(task: asyncio.Task[None]) -> None:
    """Retrieve a background task's outcome (its waiters, if any, saw it already)."""
    if not task.cancelled():
        task.exception()


def _confirm_absent(
    backend: Backend, missing: Sequence[KeyInfo], present: Sequence[KeyName]
) -> frozenset[KeyName]:
    if isinstance(backend, Recoverable):
        return backend.confirm_absent(missing, present)
    gone = set()
    for info in missing:
        try:
            backend.describe(info.key)
        except UnknownKey:
            gone.add(info.key)
    return frozenset(gone)
