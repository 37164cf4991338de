"""Sign, check and audit in one step: the group commit of sign records by the token thread."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd._audit import AuditTrail, Ticket, verify_file
from signerd._calls import AuditEvent, Peer
from signerd._keyservice import KeyService, Settings
from signerd._names import KeyName
from signerd._pkcs11 import from_config
from signerd.errors import AuditUnavailable

from .conftest import pkcs11_backend_config, unique

PEER = Peer(pid=1, uid=1000, gid=1000)


def _event(rid: str) -> AuditEvent:
    return AuditEvent(time=time.time(), request_id=rid, peer=PEER, operation="sign", outcome="ok")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def blocked_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """os.fsync hangs until the event is set (a sink that stopped answering)."""
    release = threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield release
    release.set()


async def test_commit_writes_the_group_in_the_chain(tmp_path: Path) -> None:
    """A committed group lands as consecutive records of the one chain, between queued ones."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(_event("before"))
    ticket = Ticket()
    written = await asyncio.to_thread(trail.commit, [_event("g1"), _event("g2")], ticket)
    await trail.record(_event("after"))
    await trail.aclose()
    assert written and ticket.seqs == [2, 3] and ticket.state == "done"
    assert [r["request_id"] for r in _records(path)] == ["before", "g1", "g2", "after"]
    assert verify_file(str(path)).ok


async def test_a_group_whose_callers_gave_up_is_unacknowledged(tmp_path: Path) -> None:
    """Records written for callers that stopped waiting are named by the next record."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    ticket = Ticket()
    assert await asyncio.to_thread(trail.commit, [_event("late")], ticket)
    trail.give_up(ticket)
    await trail.record(_event("next"))
    await trail.aclose()
    records = _records(path)
    assert records[1]["unacknowledged"] == [records[0]["seq"]]
    assert verify_file(str(path)).ok


async def test_a_group_given_up_before_its_write_is_never_written(tmp_path: Path) -> None:
    """Callers that gave up before the write began leave no record and get no signature."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    ticket = Ticket()
    trail.give_up(ticket)
    assert not await asyncio.to_thread(trail.commit, [_event("gone")], ticket)
    handed = Ticket()
    trail.give_up(handed)
    assert not trail.hand_off(lambda: [_event("gone too")], handed, lambda written: None)
    await trail.record(_event("next"))
    await trail.aclose()
    assert [r["request_id"] for r in _records(path)] == ["next"]


async def test_handed_off_group_is_written_by_the_writer(tmp_path: Path) -> None:
    """A group handed to the writer thread is written, then its finish callback says so."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(_event("first"))
    done = threading.Event()
    outcome: list[bool] = []

    def finish(written: bool) -> None:
        outcome.append(written)
        done.set()

    ticket = Ticket()
    assert trail.hand_off(lambda: [_event("h1"), _event("h2")], ticket, finish)
    assert await asyncio.to_thread(done.wait, 5)
    await trail.aclose()
    assert outcome == [True] and ticket.seqs == [2, 3]
    assert [r["request_id"] for r in _records(path)] == ["first", "h1", "h2"]


async def test_stuck_commit_refuses_everyone_at_once(
    tmp_path: Path, blocked_fsync: threading.Event
) -> None:
    """While a commit hangs in fsync, records and commits are refused within the deadline."""
    trail = AuditTrail(str(tmp_path / "audit.jsonl"), write_timeout=0.3)
    stuck = asyncio.create_task(asyncio.to_thread(trail.commit, [_event("hung")], Ticket()))
    await asyncio.sleep(0.4)
    assert trail.stuck()
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await trail.record(_event("refused"))
    assert not await asyncio.to_thread(trail.commit, [_event("refused")], Ticket())
    assert time.monotonic() - started < 0.2
    blocked_fsync.set()
    assert await stuck  # the hung write completes once the sink answers
    assert not trail.stuck()
    await trail.aclose()


@pytest.fixture
async def service_with_trail(tmp_path: Path) -> AsyncIterator[tuple[KeyService, Path]]:
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), write_timeout=0.3)
    service = KeyService(
        {"hsm": from_config(pkcs11_backend_config())},
        default_backend="hsm",
        settings=Settings(refresh_interval=0),
    )
    service.commit_audit(trail)
    await service.start()
    yield service, path
    await service.close()
    await trail.aclose()


async def test_signatures_leave_with_their_records_written(
    service_with_trail: tuple[KeyService, Path],
) -> None:
    """Each signed request's record, its kid filled in, is in the file when the signature returns."""
    svc, path = service_with_trail
    key = KeyName(unique("gc"), "feedback")
    await svc.create(key)

    async def one(i: int) -> tuple[str, bytes]:
        kid, sig = await svc.sign(key, b"x%d" % i, _event(f"r{i}"))
        assert f'"request_id":"r{i}"'.encode() in path.read_bytes()  # durable before return
        return kid, sig

    results = await asyncio.gather(*(one(i) for i in range(40)))
    records = {r["request_id"]: r for r in _records(path)}
    assert all(records[f"r{i}"]["kid"] == kid for i, (kid, _) in enumerate(results))
    assert verify_file(str(path)).ok


async def test_sign_refused_within_the_deadline_when_the_audit_hangs(
    service_with_trail: tuple[KeyService, Path], blocked_fsync: threading.Event
) -> None:
    """A sign whose record cannot be made durable answers AuditUnavailable within the deadline,
    and the next sign is refused at once without reaching the token."""
    svc, path = service_with_trail
    key = KeyName(unique("gc"), "feedback")
    blocked_fsync.set()
    await svc.create(key)
    blocked_fsync.clear()
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await svc.sign(key, b"hung", _event("hung"))
    assert time.monotonic() - started < 1.0
    batches = svc._coalescer.batches
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await svc.sign(key, b"refused", _event("refused"))
    assert time.monotonic() - started < 0.1 and svc._coalescer.batches == batches
    blocked_fsync.set()
    deadline = time.monotonic() + 5
    while True:  # recovers once the sink answers; the hung record is unacknowledged
        try:
            await svc.sign(key, b"after", _event("after"))
            break
        except AuditUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    records = {r["request_id"]: r for r in _records(path)}
    assert records["hung"]["seq"] in records["after"]["unacknowledged"]
    assert "refused" not in records
