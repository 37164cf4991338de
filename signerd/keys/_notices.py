"""Changes another process of this daemon announced and this one has not read yet.

A worker that changes a key tells the others; each re-reads the key in the
background and acknowledges (``daemon``). The worker that made the change
waits for those acknowledgements at most a second, and a re-read can fail
(the backend is slow, or an election is under way). So the acknowledgement
alone does not keep a worker from signing with what its cache held before.

``Notices`` does: from the moment a notice arrives until a read of the key
that started after it has been stored, a sign or verify with the key reads
it first (``current``). When that read fails, a sign gets the read's error
(503), never a signature by a version the change replaced; a verify answers
from the cache, as it does whenever the backend is down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..backends import KeyInfo
from ..errors import UnknownKey
from ..wire import KeyName
from ._keyring import Keyring


class Notices:
    """The keys announced as changed and not read since; ``read(key)`` asks the backend."""

    def __init__(
        self,
        keyring: Keyring,
        read: Callable[[KeyName], Awaitable[KeyInfo]],
        route: Callable[[str], str],
    ) -> None:
        self._keyring = keyring
        self._read = read
        self._route = route
        self._marks: dict[KeyName, int] = {}  # key -> the number of its latest notice
        self._last = 0

    def __contains__(self, key: object) -> bool:
        return key in self._marks

    def learn(self, key: KeyName) -> Coroutine[Any, Any, None]:
        """Another process changed ``key``: from now on, until a read of it made after this
        call is stored, signs and verifies read it first. The re-read, to run in the
        background; it never waits for this process's own admin operation on the key (that
        one may wait for the lock the announcing process holds)."""
        self._last += 1
        self._marks[key] = self._last
        return self._learn(key, self._last)

    async def _learn(self, key: KeyName, mark: int) -> None:
        ticket = self._keyring.ticket()  # a read older than one stored first is dropped
        try:
            self._keyring.store(await self._read(key), ticket)
        except UnknownKey:  # a key no longer found gets a careful re-read
            if key in self._keyring.keys:
                await self._keyring.reread(self._route(key.tenant))
        self._settle(key, mark)

    async def current(self, key: KeyName) -> KeyInfo:
        """``key`` to sign with: from the cache (an unknown name waits for the shared
        re-read), or read now when a change was announced and not read yet."""
        mark = self._marks.get(key)
        if mark is None:
            return await self._keyring.cached(key)
        info = await self._keyring.describe(key)
        self._settle(key, mark)
        return info

    def _settle(self, key: KeyName, mark: int) -> None:
        """A read made after notice ``mark`` is stored: no later notice, nothing to read."""
        if self._marks.get(key) == mark:
            del self._marks[key]
