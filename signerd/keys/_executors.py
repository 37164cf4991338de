"""Where a key's backend calls run: one executor per backend, and a tenant's backend.

Backends block, so each has its own thread pool and the event loop never waits
on one, except for an ``Inline`` backend's signatures in a worker, which run on
the loop's thread under the worker's ``StallGuard`` -- and only when the daemon
has a single backend. With several (signing domains), a token call that hangs on
the loop would stall every tenant of that worker, so every backend then runs in
its own executor: a hung domain times out alone. A ``LoopSigning`` backend sends
its signatures from the loop itself, a network exchange the loop awaits without
blocking, within the same timeout. A backend's calls for tenants take
turns tenant by tenant (``FairSlots``), so one tenant's flood does not queue
ahead of another's call; a call given up on at its timeout keeps its slot until
its thread returns, so calls wait (boundedly, for their own timeout) for a slot
rather than pile up in the executor behind threads stuck in a hung token. A call that changes the keyring (``run_change``) is
never abandoned once it has started.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

from ..backends import Backend, Inline, LoopSigning, Opening
from ..errors import BackendUnavailable, SignerdError
from ..wire import KeyName
from ._fair import FairSlots

if TYPE_CHECKING:
    from ..workers import StallGuard

__all__ = ["CHANGE_GRACE", "Executors", "run_change"]

log = logging.getLogger("signerd.keys")
_admin_log = logging.getLogger("signerd.admin")
_T = TypeVar("_T")

CHANGE_GRACE = 30.0  # seconds a backend change that outlived its timeout is still waited for


class Executors:
    """The backends by name, each with its executor; tenants routed to their backend."""

    def __init__(
        self,
        backends: Mapping[str, Backend],
        *,
        default_backend: str,
        tenant_backends: Mapping[str, str] | None,
        timeout: float,
    ) -> None:
        if default_backend not in backends:
            raise ValueError(f"default backend {default_backend!r} is not configured")
        self.backends = dict(backends)
        self._default = default_backend
        self._routes = dict(tenant_backends or {})
        self._timeout = timeout
        #: each backend's calls for tenants, shared out tenant by tenant (``FairSlots``)
        self._slots = {name: FairSlots(b.max_concurrency) for name, b in self.backends.items()}
        self._executors = {
            name: ThreadPoolExecutor(
                max_workers=b.max_concurrency, thread_name_prefix=f"signerd-{name}"
            )
            for name, b in self.backends.items()
        }
        #: on the loop only with one domain: a hung call there would stall every domain
        self._inline = (
            {n: b for n, b in self.backends.items() if isinstance(b, Inline)}
            if len(self.backends) == 1
            else {}
        )
        #: the backends that send their signs from the loop themselves
        self._loop_signing = {n: b for n, b in self.backends.items() if isinstance(b, LoopSigning)}
        #: a worker's guard: ``Inline`` backends sign on the loop's thread under it
        self.stall_guard: StallGuard | None = None

    @property
    def inline(self) -> frozenset[str]:
        """The backends whose signatures a worker may make on its loop's thread."""
        return frozenset(self._inline)

    def backend_name(self, tenant: str) -> str:
        return self._routes.get(tenant, self._default)

    def remap(
        self, default_backend: str, tenant_backends: Mapping[str, str]
    ) -> Callable[[str], bool]:
        """Route tenants by a new map over the same backends (ValueError, and nothing
        changed, when it names another backend); whether a tenant moved to another one."""
        for name in (default_backend, *tenant_backends.values()):
            if name not in self.backends:
                raise ValueError(f"no backend named {name!r}")
        old_default, old_routes = self._default, self._routes
        self._default, self._routes = default_backend, dict(tenant_backends)
        return lambda tenant: old_routes.get(tenant, old_default) != self.backend_name(tenant)

    async def run(
        self,
        backend: str,
        fn: Callable[[], _T],
        timeout: float | None = None,
        *,
        tenant: str | None = None,
    ) -> _T:
        """``fn()`` in the backend's executor within the timeout; a ``tenant``'s call waits for
        a slot first (its turn among the backend's tenants), within the same timeout."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout or self._timeout):
                if tenant is None:
                    return await loop.run_in_executor(self._executors[backend], fn)
                slots = self._slots[backend]
                await slots.acquire(tenant)
                running: Future[_T] | None = None
                try:
                    running = self._executors[backend].submit(fn)
                    result = await asyncio.wrap_future(running)
                except BaseException:
                    if running is None or running.done():
                        slots.release()
                    else:  # given up on (a hung token): the slot is the thread's until it
                        # returns, so no call queues behind a thread that is not coming back
                        running.add_done_callback(lambda _: _soon(loop, slots.release))
                    raise
                slots.release()
                return result
        except TimeoutError as exc:
            log.error("signerd.backend_timeout backend=%s", backend)
            raise BackendUnavailable("the key backend did not answer in time") from exc

    async def open(self, timeout: float) -> None:
        """Open each ``Opening`` backend's library and session, one after another. A failure
        fails the start, as the first listing would: a refused login is tried once."""
        for name, backend in self.backends.items():
            if isinstance(backend, Opening):
                await self.run(name, backend.open, timeout)

    async def change(self, key: KeyName, call: Callable[[Backend], _T]) -> _T:
        """``call(backend)``, a keyring change, for ``key``'s backend (``run_change``)."""
        name = self.backend_name(key.tenant)
        backend = self.backends[name]
        return await run_change(self._executors[name], lambda: call(backend), self._timeout)

    async def on(self, key: KeyName, call: Callable[[Backend], _T], *, on_loop: bool = False) -> _T:
        """``call(backend)`` for ``key``'s backend, in its executor; with ``on_loop`` (signing),
        on this thread under the worker's ``StallGuard`` when the backend is ``Inline``, no
        other thread is in its library and the token is not taken for hung (``clear``)."""
        name = self.backend_name(key.tenant)
        backend = self.backends[name]
        inline, guard = self._inline.get(name), self.stall_guard
        if on_loop and inline is not None and guard is not None:
            if guard.clear() and inline.try_enter():
                try:
                    return guard.call(
                        lambda: call(backend), self._timeout, "token", BackendUnavailable
                    )
                finally:
                    inline.leave()
            result = await self.run(name, lambda: call(backend), tenant=key.tenant)
            guard.answered()  # the token answers: the loops may sign again
            return result
        return await self.run(name, lambda: call(backend), tenant=key.tenant)

    async def sign_on_loop(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError] | None:
        """``key``'s backend's ``sign_on_loop`` within the timeout, when it has one; None:
        sign the blocking way (``on``)."""
        name = self.backend_name(key.tenant)
        backend = self._loop_signing.get(name)
        if backend is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                return await backend.sign_on_loop(key, version, items)
        except TimeoutError as exc:
            log.error("signerd.backend_timeout backend=%s", name)
            raise BackendUnavailable("the key backend did not answer in time") from exc

    async def close(self) -> None:
        """Close every backend (within the timeout), then stop the executors."""
        for name, backend in self.backends.items():
            try:
                await self.run(name, backend.close)
            except SignerdError:
                log.warning("signerd.backend_close_failed backend=%s", name)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)


def _soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], object]) -> None:
    """``fn()`` on ``loop``'s thread (from an executor's thread); nothing once it is closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(fn)


async def run_change(executor: Executor, fn: Callable[[], _T], timeout: float) -> _T:
    """``fn()`` (a backend call that changes something) in ``executor``. Past ``timeout``, a
    call that never started is cancelled (BackendUnavailable: nothing changed); one that
    started is waited for up to CHANGE_GRACE more, so that the admin lock is held until the
    backend is done and a retry finds the change made, or not, for certain."""
    running = executor.submit(fn)
    result = asyncio.wrap_future(running)
    try:
        async with asyncio.timeout(timeout):
            return await asyncio.shield(result)
    except TimeoutError as exc:
        _admin_log.error("signerd.backend_timeout change=yes")
        if running.cancel():
            raise BackendUnavailable("the key backend did not answer in time") from exc
    try:
        async with asyncio.timeout(CHANGE_GRACE):
            return await asyncio.shield(result)
    except TimeoutError as exc:
        _admin_log.critical("signerd.backend_change_stuck")
        raise BackendUnavailable("the key backend did not finish a change") from exc
