"""A keyring listing never puts back a state older than a key read stored while it ran."""

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


class SlowListing:
    """A store whose listing is read when it starts and answered when ``answer`` is set."""

    max_concurrency = 2

    def __init__(self, state: KeyInfo) -> None:
        self.state = state
        self.listing_read, self.answer = threading.Event(), threading.Event()

    def list_keys(self) -> list[KeyInfo]:
        listed = [self.state]
        self.listing_read.set()
        assert self.answer.wait(5)
        return listed

    def describe(self, key: KeyName) -> KeyInfo:
        return self.state


async def _run(name: str, fn: Callable[[], _T], timeout: float | None = None) -> _T:
    return await asyncio.to_thread(fn)


async def test_a_listing_does_not_overwrite_a_key_read_after_it_started() -> None:
    v1 = _version(1, VersionState.ACTIVE)
    before = KeyInfo(KEY, (v1,))
    store = SlowListing(before)
    ring = Keyring({"b": store}, Settings(), _run, lambda tenant: "b")  # type: ignore[dict-item]
    ring.store(before)
    listing = asyncio.create_task(ring.reread("b"))
    await asyncio.to_thread(store.listing_read.wait, 5)
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
