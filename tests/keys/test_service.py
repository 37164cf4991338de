"""The key service over a real SoftHSM token: lifecycle rules, verify, coalescing, refresh."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from signerd.backends import VersionState
from signerd.backends.pkcs11 import from_config
from signerd.errors import (
    BackendUnavailable,
    ConfirmationRequired,
    DestroyedKid,
    InvalidSignature,
    InvalidState,
    RetiredKid,
    UnknownKey,
    UnknownKid,
    UnknownVersion,
)
from signerd.keys import KeyService, Settings, run_change
from signerd.wire import KeyName

from ..conftest import pkcs11_backend_config, unique


def _service(**settings: object) -> KeyService:
    return KeyService(
        {"hsm": from_config(pkcs11_backend_config())},
        default_backend="hsm",
        settings=Settings(refresh_interval=0, **settings),  # type: ignore[arg-type]
    )


async def _replace_active_elsewhere(key: KeyName) -> None:
    """Another daemon on the same token rotates, then retires and destroys version 1."""
    other = _service()
    await other.start()
    try:
        await other.rotate(key)
        await other.retire(key, 1)
        await other.destroy(key, 1, confirm=key.kid(1), now=True)
    finally:
        await other.close()


@pytest.fixture
async def svc() -> AsyncIterator[KeyService]:
    service = _service()
    await service.start()
    yield service
    await service.close()


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("ks"), "feedback")


async def test_sign_rotate_old_signature_still_verifies(svc: KeyService, key: KeyName) -> None:
    """After rotation the old signature verifies under its kid and the new version signs."""
    await svc.create(key)
    kid1, sig1 = await svc.sign(key, b"payload")
    info, new = await svc.rotate(key)
    assert new.kid == key.kid(2) and info.active == new
    kid2, sig2 = await svc.sign(key, b"payload")
    assert (kid1, kid2) == (key.kid(1), key.kid(2))
    _, v1 = await svc.verify(kid1, b"payload", sig1)
    assert v1.state is VersionState.VERIFY_ONLY
    await svc.verify(kid2, b"payload", sig2)


async def test_retire_then_destroy_refuses_with_typed_errors(svc: KeyService, key: KeyName) -> None:
    """A retired kid answers retired_kid; a destroyed kid answers destroyed_kid and stays known."""
    await svc.create(key)
    kid1, sig1 = await svc.sign(key, b"m")
    await svc.rotate(key)
    await svc.retire(key, 1)
    with pytest.raises(RetiredKid):
        await svc.verify(kid1, b"m", sig1)
    await svc.destroy(key, 1, confirm=kid1, now=True)
    with pytest.raises(DestroyedKid):
        await svc.verify(kid1, b"m", sig1)
    _, v = await svc.lookup_kid(kid1)
    assert v.state is VersionState.DESTROYED


async def test_verify_rejects_tampering_and_unknown_kids(svc: KeyService, key: KeyName) -> None:
    """A changed byte is invalid_signature; a kid of no key is unknown_kid."""
    await svc.create(key)
    kid, sig = await svc.sign(key, b"abc")
    with pytest.raises(InvalidSignature):
        await svc.verify(kid, b"abd", sig)
    with pytest.raises(InvalidSignature):
        await svc.verify(kid, b"abc", sig[:-1] + bytes([sig[-1] ^ 1]))
    with pytest.raises(UnknownKid):
        await svc.verify(key.kid(9), b"abc", sig)
    with pytest.raises(UnknownKid):
        await svc.verify("not a kid", b"abc", sig)


async def test_lifecycle_rules(svc: KeyService, key: KeyName) -> None:
    """Only allowed transitions happen: the active version is never retired or destroyed."""
    await svc.create(key)
    with pytest.raises(InvalidState):
        await svc.retire(key, 1)
    with pytest.raises(InvalidState):
        await svc.promote(key, 1)
    with pytest.raises(ConfirmationRequired):
        await svc.destroy(key, 1, confirm=None, now=True)
    with pytest.raises(InvalidState):
        await svc.destroy(key, 1, confirm=key.kid(1), now=True)
    with pytest.raises(InvalidState):
        await svc.destroy(key, 1, confirm=None)  # a schedule: the active version neither
    with pytest.raises(UnknownVersion):
        await svc.retire(key, 5)
    info, pending = await svc.rotate(key, pending=True)
    assert (
        pending.state is VersionState.PENDING
        and info.active is not None
        and info.active.version == 1
    )
    kid, _ = await svc.sign(key, b"x")
    assert kid == key.kid(1), "a pending version never signs"
    info = await svc.promote(key, 2)
    assert [v.state for v in info.versions] == [VersionState.VERIFY_ONLY, VersionState.ACTIVE]


async def test_pending_version_verifies_and_is_published(svc: KeyService, key: KeyName) -> None:
    """A pending version's public key is in the published set before it signs."""
    await svc.create(key)
    _, pending = await svc.rotate(key, pending=True)
    assert pending.kid in {v.kid for v in svc.published(key.tenant)}


async def test_unknown_key_is_typed(svc: KeyService) -> None:
    """Signing or describing a key that does not exist raises UnknownKey."""
    with pytest.raises(UnknownKey):
        await svc.sign(KeyName(unique("ks"), "nope"), b"x")


async def test_concurrent_signs_are_coalesced(svc: KeyService, key: KeyName) -> None:
    """Many concurrent signs reach the token in fewer batch calls, each caller getting its own answer."""
    await svc.create(key)
    before = svc.coalescer.batches
    results = await asyncio.gather(*(svc.sign(key, f"m{i}".encode()) for i in range(200)))
    batches = svc.coalescer.batches - before
    assert batches < 200
    for i, (kid, sig) in enumerate(results):
        await svc.verify(kid, f"m{i}".encode(), sig)


async def test_unknown_kid_triggers_one_refresh(svc: KeyService, key: KeyName) -> None:
    """A kid minted by another daemon on the same token is learnt by one refresh."""
    other = _service()
    await other.start()
    try:
        await other.create(key)
        _, new = await other.rotate(key)
        kid, sig = await other.sign(key, b"hello")
        assert kid == new.kid
        await svc.verify(kid, b"hello", sig)
    finally:
        await other.close()


async def test_retention_retires_old_verify_only_versions(key: KeyName) -> None:
    """retain_verify_only=1 keeps one verify-only version and retires older ones on rotation."""
    service = _service(retain_verify_only=1)
    await service.start()
    try:
        await service.create(key)
        await service.rotate(key)
        info, _ = await service.rotate(key)
        assert [v.state for v in info.versions] == [
            VersionState.RETIRED,
            VersionState.VERIFY_ONLY,
            VersionState.ACTIVE,
        ]
    finally:
        await service.close()


async def test_bootstrap_creates_missing_keys(key: KeyName) -> None:
    """start(bootstrap=...) creates keys that do not exist and keeps those that do."""
    service = _service()
    await service.start(bootstrap=[key])
    try:
        first = await service.describe(key)
    finally:
        await service.close()
    again = _service()
    await again.start(bootstrap=[key])
    try:
        assert await again.describe(key) == first
    finally:
        await again.close()


async def test_sign_follows_a_rotation_made_elsewhere(svc: KeyService, key: KeyName) -> None:
    """When another daemon destroyed the cached active version, sign re-reads and uses the new one."""
    await svc.create(key)
    await _replace_active_elsewhere(key)
    intents: list[str] = []  # the kid of each attempt's intent record
    kid, sig = await svc.sign(key, b"after", intents.append)
    assert kid == key.kid(2) and intents == [key.kid(1), key.kid(2)]
    await svc.verify(kid, b"after", sig)


async def test_sign_many_signs_in_chunks_and_follows_a_rotation(key: KeyName) -> None:
    """A batch's items for one key: one backend call per max_batch items, every signature
    checked and verifiable; after another daemon destroyed the active version, the whole
    set is signed with the new one."""
    svc = _service(max_batch=8)
    await svc.start()
    try:
        await svc.create(key)
        datas = [b"item-%d" % i for i in range(20)]
        batches = svc.coalescer.batches
        kid, signed = await svc.sign_many(key, datas)
        assert kid == key.kid(1) and len(signed) == 20
        assert svc.coalescer.batches == batches  # not through the per-item coalescer
        for data, sig in zip(datas, signed, strict=True):
            assert isinstance(sig, bytes)
            await svc.verify(kid, data, sig)
        await _replace_active_elsewhere(key)
        kid, signed = await svc.sign_many(key, datas[:3])
        assert kid == key.kid(2)
        for data, sig in zip(datas, signed, strict=False):
            assert isinstance(sig, bytes)
            await svc.verify(kid, data, sig)
    finally:
        await svc.close()


async def test_a_keyring_change_past_its_timeout_is_waited_for_or_never_started() -> None:
    """run_change: a change that started and outlives the timeout is waited for and its result
    returned (the admin lock is held until the backend is done); one that had not started by
    then is cancelled, answered BackendUnavailable, and never runs."""
    ran: list[str] = []

    def slow() -> str:
        time.sleep(0.5)
        ran.append("slow")
        return "made"

    with ThreadPoolExecutor(max_workers=1) as executor:
        started = time.monotonic()
        queued = asyncio.ensure_future(run_change(executor, lambda: ran.append("queued"), 0.2))
        assert await run_change(executor, slow, 0.2) == "made"
        assert 0.45 <= time.monotonic() - started < 2.0
        with pytest.raises(BackendUnavailable):
            await queued
    assert ran == ["slow"]


async def test_learn_does_not_wait_for_an_admin_operation_of_its_own(
    svc: KeyService, key: KeyName
) -> None:
    """A change made elsewhere is learnt while this process's own rotate waits for the lock."""
    await svc.create(key)
    entered, release = asyncio.Event(), asyncio.Event()

    @contextlib.asynccontextmanager
    async def workers_lock(_key: KeyName) -> AsyncIterator[None]:
        entered.set()  # held by the worker whose notice arrives next
        await release.wait()
        yield

    svc.admin_guard = workers_lock
    waiting = asyncio.create_task(svc.rotate(key))
    await asyncio.wait_for(entered.wait(), 5)
    other = _service()
    await other.start()
    try:
        await other.rotate(key)
    finally:
        await other.close()
    await asyncio.wait_for(svc.learn(key), 5)
    assert (await svc.sign(key, b"m"))[0] == key.kid(2)
    release.set()
    _, new = await asyncio.wait_for(waiting, 10)
    assert new.kid == key.kid(3)
    assert (await svc.sign(key, b"m"))[0] == key.kid(3)


async def test_after_a_notice_signs_and_verifies_read_the_key_first(
    svc: KeyService, key: KeyName
) -> None:
    """A change announced by another worker whose re-read has not run (slow, or failed): a
    sign reads the key before signing, never with the version the change replaced, and a
    verify reads it before accepting a kid the change retired."""
    await svc.create(key)
    kid1, sig1 = await svc.sign(key, b"m")
    other = _service()
    await other.start()
    try:
        await other.rotate(key)
        await other.retire(key, 1)
    finally:
        await other.close()
    svc.learn(key).close()  # announced; its re-read never runs
    reads = svc.counters.key_reads
    assert (await svc.sign(key, b"m"))[0] == key.kid(2)
    assert svc.counters.key_reads == reads + 1
    await svc.sign(key, b"m")  # read once: the next sign is served from the cache
    assert svc.counters.key_reads == reads + 1
    svc.learn(key).close()
    with pytest.raises(RetiredKid):
        await svc.verify(kid1, b"m", sig1)
    assert svc.counters.key_reads == reads + 2


async def test_after_a_notice_an_unreadable_key_is_not_signed_with_but_verifies(
    svc: KeyService, key: KeyName, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change announced while the backend cannot be read: a sign answers 503 rather than
    sign with what the cache held; a verify answers from the cache; once the key can be
    read again, signs go on."""
    await svc.create(key)
    kid1, sig1 = await svc.sign(key, b"m")
    _, backend = svc.backend_of(key)

    def unreadable(_key: KeyName) -> None:
        raise BackendUnavailable("down")

    monkeypatch.setattr(backend, "describe", unreadable)
    with pytest.raises(BackendUnavailable):
        await svc.learn(key)
    with pytest.raises(BackendUnavailable):
        await svc.sign(key, b"m")
    await svc.verify(kid1, b"m", sig1)
    monkeypatch.undo()
    assert (await svc.sign(key, b"m"))[0] == kid1


async def test_an_older_read_never_overwrites_a_newer_one(svc: KeyService, key: KeyName) -> None:
    """A read that started before one already stored is dropped: the cache keeps the newer."""
    first = await svc.create(key)
    older, newer = svc._keyring.ticket(), svc._keyring.ticket()
    other = _service()
    await other.start()
    try:
        rotated, _ = await other.rotate(key)
    finally:
        await other.close()
    svc._keyring.store(rotated, newer)
    svc._keyring.store(first, older)
    assert (await svc.sign(key, b"m"))[0] == key.kid(2)
