"""Reads of the keyring are stored in the order they started: a listing never puts back a
state older than a key read stored while it ran, nor a key read one older than a listing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.backends import KeyInfo, KeyVersion, VersionState
from signerd.keys import Settings
from signerd.keys._keyring import Keyring
from signerd.wire import KeyName

_T = TypeVar("_T")
KEY = KeyName("t", "k")


def _version(number: int, state: VersionState) -> KeyVersion:
    public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    return KeyVersion(number, KEY.kid(number), state, public, created_at=0)


class SlowStore:
    """A store whose slow call (``slow``: a listing or a key read) is read when it starts
    and answered when ``answer`` is set; the other kind answers at once."""

    max_concurrency = 2

    def __init__(self, state: KeyInfo, slow: str) -> None:
        self.state, self.slow = state, slow
        self.read, self.answer = threading.Event(), threading.Event()

    def _held(self, what: str) -> KeyInfo:
        seen = self.state
        if what == self.slow:
            self.read.set()
            assert self.answer.wait(5)
        return seen

    def list_keys(self) -> list[KeyInfo]:
        return [self._held("listing")]

    def describe(self, key: KeyName) -> KeyInfo:
        return self._held("describe")


async def _run(name: str, fn: Callable[[], _T], timeout: float | None = None) -> _T:
    return await asyncio.to_thread(fn)


async def test_a_listing_does_not_overwrite_a_key_read_after_it_started() -> None:
    v1 = _version(1, VersionState.ACTIVE)
    before = KeyInfo(KEY, (v1,))
    store = SlowStore(before, "listing")
    ring = Keyring({"b": store}, Settings(), _run, lambda tenant: "b")  # type: ignore[dict-item]
    ring.store(before)
    listing = asyncio.create_task(ring.reread("b"))
    await asyncio.to_thread(store.read.wait, 5)
    # rotated elsewhere while the listing is on its way; a read of the key stores it first
    v2 = _version(2, VersionState.ACTIVE)
    store.state = KeyInfo(KEY, (_version(1, VersionState.VERIFY_ONLY), v2))
    assert (await ring.describe(KEY)).active == v2
    store.answer.set()
    await asyncio.wait_for(listing, 5)
    info = ring.keys[KEY]
    assert info.active == v2 and ring.kids[KEY.kid(2)].version == v2
    await ring.reread("b")  # a listing that started after the read is stored
    assert ring.keys[KEY].active == v2 and ring.counters.keyring_reads == 2


async def test_a_key_read_does_not_overwrite_a_listing_that_started_after_it() -> None:
    before = KeyInfo(KEY, (_version(1, VersionState.ACTIVE),))
    store = SlowStore(before, "describe")
    ring = Keyring({"b": store}, Settings(), _run, lambda tenant: "b")  # type: ignore[dict-item]
    ring.store(before)
    read = asyncio.create_task(ring.describe(KEY))
    await asyncio.to_thread(store.read.wait, 5)
    # rotated elsewhere while the key read is on its way; a listing stores it first
    v2 = _version(2, VersionState.ACTIVE)
    store.state = KeyInfo(KEY, (_version(1, VersionState.VERIFY_ONLY), v2))
    await ring.reread("b")
    store.answer.set()
    assert (await asyncio.wait_for(read, 5)).active == v2  # the newer state, from the cache
    assert ring.keys[KEY].active == v2 and KEY.kid(2) in ring.kids
