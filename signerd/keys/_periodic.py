"""The periodic re-read of the keyring (``keys.refresh_interval``), cheap when nothing changed.

A full listing of a PKCS#11 token is a search, and a search on SoftHSM opens
every object file of the token: about 2 s with 10,000 key versions, with the
token's lock held (signatures wait behind it) and a CPU taken from the other
workers. A backend that can tell cheaply that the keys it listed last are
unchanged (``Revalidating``) is asked that instead, and listed in full only
when it cannot say so, or at least every ``FULL_EVERY`` periods, for keys
another daemon created meanwhile (a key or kid asked for by name is looked up
at once anyway). Backends without it are listed in full every period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from ..backends import Backend, Revalidating
from ..errors import SignerdError

__all__ = ["FULL_EVERY", "refresh_periodically"]

log = logging.getLogger("signerd.keys")

FULL_EVERY = 10  # periods between full listings of a backend that can revalidate


async def refresh_periodically(
    interval: float,
    backends: Mapping[str, Backend],
    run: Callable[[str, Callable[[], bool]], Awaitable[bool]],
    reread: Callable[[str], Awaitable[None]],
) -> None:
    """Every ``interval`` seconds, each backend side by side: revalidated, or re-read in full
    (``reread(name)``); a failure is logged and the next period tries again."""
    quick = dict.fromkeys(backends, 0)  # revalidations since the last full listing

    async def one(name: str) -> None:
        backend = backends[name]
        if isinstance(backend, Revalidating) and quick[name] < FULL_EVERY - 1:
            try:
                same = await run(name, backend.unchanged)
            except SignerdError:
                same = False
            if same:
                quick[name] += 1
                return
        quick[name] = 0
        await reread(name)

    while True:
        await asyncio.sleep(interval)
        results = await asyncio.gather(*(one(n) for n in backends), return_exceptions=True)
        for result in results:
            if isinstance(result, SignerdError):
                log.warning("signerd.refresh_failed code=%s", result.code)
            elif isinstance(result, BaseException):
                raise result
