"""Records nobody waits for: queued with the next group write, bounded, refused while stuck;
only fail-closed answers wait for their record's fsync."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import AuditEvent, AuditTrail, verify_file
from signerd.authz import Peer
from signerd.errors import AuditUnavailable
from signerd.server import Front

from ..conftest import OpenGate

PEER = Peer(pid=1, uid=1000, gid=1000)


def _event(rid: str) -> AuditEvent:
    return AuditEvent(time=time.time(), request_id=rid, peer=PEER, operation="sign", outcome="ok")


def _front(path: Path, routes: list[tuple[str, Any, Any]]) -> tuple[AuditTrail, Front]:
    """A trail at ``path`` and a ``Front`` answering POST on ``routes`` (path, handler, op)."""
    trail = AuditTrail(str(path), write_timeout=2.0)
    front = Front(gate=OpenGate(), audit=trail, peer_lookup=lambda sock: PEER)
    front.add_routes([("POST", url, handler, op) for url, handler, op in routes])
    return trail, front


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


async def test_submitted_records_go_out_with_the_next_group(tmp_path: Path) -> None:
    """A record nobody waits for joins the chain in order, with the next write."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    assert trail.submit(_event("queued-1"))
    assert trail.submit(_event("queued-2"))
    await trail.record(_event("waited"))  # written in the same group as the two before it
    await trail.aclose()
    assert [r["request_id"] for r in _records(path)] == ["queued-1", "queued-2", "waited"]
    assert verify_file(str(path)).ok


async def test_submit_is_refused_at_once_while_the_writer_is_stuck(
    tmp_path: Path, blocked_fsync: threading.Event
) -> None:
    """While a write hangs, submit says no without blocking, and a closed trail takes nothing."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), write_timeout=0.3)
    hung = asyncio.create_task(trail.record(_event("hung")))
    await asyncio.sleep(0.4)
    started = time.monotonic()
    assert not trail.submit(_event("refused"))
    assert time.monotonic() - started < 0.05
    with pytest.raises(AuditUnavailable):
        await hung
    blocked_fsync.set()
    deadline = time.monotonic() + 5
    while not trail.submit(_event("after")):  # the writer is back once fsync returns
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await trail.aclose()
    assert not trail.submit(_event("closed"))
    ids = [r["request_id"] for r in _records(path)]
    assert "refused" not in ids and "closed" not in ids and ids[-1] == "after"


async def test_submit_queue_is_bounded(tmp_path: Path, blocked_fsync: threading.Event) -> None:
    """At most _MAX_QUEUED records wait; past that submit refuses instead of growing memory."""
    from signerd.audit import _trail as _audit

    trail = AuditTrail(str(tmp_path / "audit.jsonl"), write_timeout=30)
    hung = asyncio.create_task(trail.record(_event("hung")))  # the writer is in fsync now
    await asyncio.sleep(0.1)
    taken = sum(trail.submit(_event(f"q{i}")) for i in range(_audit._MAX_QUEUED + 10))
    assert taken == _audit._MAX_QUEUED
    blocked_fsync.set()
    await hung
    await trail.aclose()


async def test_only_fail_closed_answers_wait_for_the_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Front: a verify's answer does not wait for a slow fsync, a sign's does; both
    records end up in the chain."""
    from signerd.authz import Operation
    from signerd.server import Request, RequestContext, Response, json_response

    real = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)

    async def handle(ctx: RequestContext) -> Response:
        return json_response({"ok": True})

    path = tmp_path / "audit.jsonl"
    trail, front = _front(
        path, [("/v1/x/verify", handle, Operation.VERIFY), ("/v1/x/sign", handle, Operation.SIGN)]
    )

    def req(url: bytes) -> Request:
        r = Request(method="POST", raw_url=url, raw_headers=[], keep_alive=True)
        r.complete = True
        return r

    async def timed(url: bytes) -> tuple[int, float]:
        started = time.monotonic()
        answer = await front.dispatch(req(url))
        answer.written()  # what the connection does once it has written the answer
        return answer.status, time.monotonic() - started

    assert await timed(b"/v1/x/sign") >= (200, 0.25)  # waited for its fsync
    status, took = await timed(b"/v1/x/verify")
    assert status == 200 and took < 0.15, took
    await trail.aclose()
    assert [r["operation"] for r in _records(path)] == ["sign", "verify"]
    assert verify_file(str(path)).ok


async def test_a_success_record_waits_for_the_next_write_and_a_refusal_goes_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through Front: a verify's success record makes no write of its own (it joins the next
    one, here the trail's close); a refusal's record is handed to the writer at once."""
    import signerd.audit._loopside as loopside
    from signerd.authz import Operation
    from signerd.errors import InvalidSignature
    from signerd.server import Request, RequestContext, Response, json_response

    monkeypatch.setattr(loopside, "LATER", 30.0)

    async def good(ctx: RequestContext) -> Response:
        return json_response({"ok": True})

    async def bad(ctx: RequestContext) -> Response:
        raise InvalidSignature()

    path = tmp_path / "audit.jsonl"
    trail, front = _front(
        path, [("/v1/x/good", good, Operation.VERIFY), ("/v1/x/bad", bad, Operation.VERIFY)]
    )

    async def answer(url: bytes) -> int:
        r = Request(method="POST", raw_url=url, raw_headers=[], keep_alive=True)
        r.complete = True
        response = await front.dispatch(r)
        response.written()
        return response.status

    assert await answer(b"/v1/x/good") == 200
    await asyncio.sleep(0.3)
    assert not path.exists() or _records(path) == []  # waits for a write to join
    assert await answer(b"/v1/x/bad") == 401
    deadline = time.monotonic() + 5
    while (not path.exists() or len(_records(path)) < 2) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [r["outcome"] for r in _records(path)] == ["ok", "invalid_signature"]
    await trail.aclose()
    assert verify_file(str(path)).ok
