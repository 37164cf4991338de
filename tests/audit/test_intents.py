"""Intent and outcome records of a sign: the intent is durable before the signature leaves,
its outcome follows; an intent without an outcome is reported as a signature that may have
been made."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import AuditEvent, AuditTrail, verify_trail
from signerd.authz import Peer
from signerd.cli import main
from signerd.errors import AuditUnavailable
from signerd.testing import wait_until

from ..conftest import start_daemon, unique
from ..support.rawhttp import request

PEER = Peer(pid=1, uid=1000, gid=1000)


def _event(rid: str, outcome: str, kid: str = "t.k.v1") -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        request_id=rid,
        peer=PEER,
        operation="sign",
        outcome=outcome,
        tenant="t",
        key="t/k",
        kid=kid,
        payload_sha256=("00" * 32,),
        status=0 if outcome == "intent" else 200,
    )


def _records(*paths: Path) -> list[dict[str, Any]]:
    """The whole records in ``paths``: a line the writer is still writing (no newline yet)
    is not one."""
    return [
        json.loads(line)
        for p in paths
        for line in p.read_bytes().splitlines(keepends=True)
        if line.endswith(b"\n")
    ]


async def test_intent_is_durable_only_after_its_fsync(
    tmp_path: Path, blocked_fsync: threading.Event
) -> None:
    """``ahead`` hands the record to the writer thread at once; ``durable`` returns only once
    its fsync has returned."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), write_timeout=5.0)
    pending = trail.ahead(_event("r1", "intent"))
    done = threading.Event()

    async def wait() -> None:
        await pending.durable()
        done.set()

    task = asyncio.create_task(wait())
    await asyncio.sleep(0.3)
    assert not done.is_set()
    assert b'"outcome":"intent"' in path.read_bytes()  # written, not yet fsync'd
    blocked_fsync.set()
    await asyncio.wait_for(task, 5)
    await trail.aclose()
    assert [r["outcome"] for r in _records(path)] == ["intent"]


async def test_intent_that_cannot_be_made_durable_refuses_within_the_deadline(
    tmp_path: Path, blocked_fsync: threading.Event
) -> None:
    """An intent whose fsync does not return is AuditUnavailable by write_timeout, and the
    next intent is refused at once (the writer is stuck)."""
    trail = AuditTrail(str(tmp_path / "audit.jsonl"), write_timeout=0.3)
    pending = trail.ahead(_event("r1", "intent"))
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await pending.durable()
    assert time.monotonic() - started < 1.0
    wait_until(lambda: trail._stuck(), 5, "the writer counted as stuck")
    with pytest.raises(AuditUnavailable):
        trail.ahead(_event("r2", "intent"))
    blocked_fsync.set()
    await trail.aclose()


async def test_verify_reports_an_intent_without_outcome(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """verify passes a trail whose last sign has an intent and no outcome, and notes that a
    signature may have been made (also in `signerctl audit verify`); paired intents, and an
    outcome written before a reused request id's intent, do not count."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.ahead(_event("done", "intent")).durable()
    await trail.record(_event("done", "ok"))
    await trail.record(_event("reused", "ok"))
    await trail.ahead(_event("reused", "intent", kid="t.k.v2")).durable()
    await trail.ahead(_event("crashed", "intent", kid="t.k.v3")).durable()
    await trail.aclose()

    report, _ = verify_trail([str(path)], use_anchors=False)
    assert report.ok, report
    unfinished = [n for n in report.notes if "intent" in n]
    assert len(unfinished) == 2, report.notes
    assert "request reused" in unfinished[0] and "made with t.k.v2" in unfinished[0]
    assert "request crashed" in unfinished[1] and "made with t.k.v3" in unfinished[1]
    assert not any("request done" in n for n in report.notes)

    capsys.readouterr()
    assert main(["audit", "verify", "--no-anchor", str(path)]) == os.EX_OK
    out = capsys.readouterr().out
    assert out.startswith("ok: 5 records, chain intact")
    assert "request crashed (sign) has no outcome record: a signature may have been made" in out


def test_daemon_sign_writes_intent_then_outcome(tmp_path: Path) -> None:
    """A signed answer has an intent record before it (kid about to sign, payload HMAC, request
    id) and an ok record after it with the same request id, kid and HMAC; verify notes none."""
    d = start_daemon(tmp_path / "d", audit={"fsync": True})
    try:
        sock = str(d.socket_path)
        key = f"{unique('intent')}/k"
        assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201
        rids = [f"intent-pair-{i}" for i in range(3)]
        kids = []
        for rid in rids:
            data = base64.b64encode(os.urandom(16)).decode()
            reply = request(
                sock, "POST", "/v1/sign", {"key": key, "data": data}, headers={"X-Request-Id": rid}
            )
            assert reply.status == 200, reply.body
            kids.append(reply.json["kid"])
        audit = tmp_path / "d" / "audit"

        def pairs() -> dict[str, list[dict[str, Any]]] | None:
            got: dict[str, list[dict[str, Any]]] = {rid: [] for rid in rids}
            for rec in _records(*sorted(audit.glob("*.jsonl"))):
                if rec["request_id"] in got:
                    got[rec["request_id"]].append(rec)
            return got if all(len(v) == 2 for v in got.values()) else None

        found = wait_until(pairs, 10, "the outcome records")
        assert found is not None
        for rid, kid in zip(rids, kids, strict=True):
            intent, outcome = sorted(found[rid], key=lambda r: r["seq"])
            assert (intent["outcome"], intent["status"], intent["kid"]) == ("intent", 0, kid)
            assert (outcome["outcome"], outcome["status"], outcome["kid"]) == ("ok", 200, kid)
            assert intent["payload_hmac"] == outcome["payload_hmac"] and intent["payload_hmac"]
            assert intent["operation"] == outcome["operation"] == "sign"
    finally:
        d.stop()
    report, _ = verify_trail([str(audit)])
    assert report.ok, report
    assert not [n for n in report.notes if "intent" in n], report.notes


@pytest.mark.timeout(120)
def test_reloads_under_load_refuse_no_sign(tmp_path: Path) -> None:
    """SIGHUP every 50 ms (policy reload, audit reopen) while 8 callers sign on 2 workers with
    fsync: every sign is answered 200, and the trail verifies with every intent paired."""
    d = start_daemon(
        tmp_path / "d", server={"workers": 2}, audit={"fsync": True, "write_timeout": 2.0}
    )
    try:
        sock = str(d.socket_path)
        key = f"{unique('reload')}/k"
        assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201
        stop = threading.Event()
        answers: list[int] = []
        lock = threading.Lock()

        def caller() -> None:
            while not stop.is_set():
                data = base64.b64encode(os.urandom(16)).decode()
                status = request(sock, "POST", "/v1/sign", {"key": key, "data": data}).status
                with lock:
                    answers.append(status)

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        try:
            for _ in range(40):
                d.sighup()
                stop.wait(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
        assert answers and set(answers) == {200}, sorted(set(answers))
        assert "signerd.policy_reloaded" in d.log_text()
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    report, _ = verify_trail([str(tmp_path / "d" / "audit")])
    assert report.ok, report
    assert not [n for n in report.notes if "intent" in n], report.notes


async def test_verify_lists_ten_unfinished_intents_then_counts(tmp_path: Path) -> None:
    """Of 12 intents without an outcome, verify names the first 10 and counts the other 2."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    for i in range(12):
        await trail.ahead(_event(f"lost-{i:02d}", "intent")).durable()
    await trail.aclose()
    report, _ = verify_trail([str(path)], use_anchors=False)
    assert report.ok
    named = [n for n in report.notes if "has no outcome record" in n]
    assert [n.split("request ")[1].split(" ")[0] for n in named] == [
        f"lost-{i:02d}" for i in range(10)
    ]
    assert "2 more intent record(s) without an outcome" in report.notes


def test_openbao_signs_have_their_intent_before_their_outcome(
    tmp_path: Path, openbao_dev: Any
) -> None:
    """On OpenBao transit too, 16 concurrent signs each have an intent record (the kid about
    to sign) before their ok record."""
    import concurrent.futures

    from ..support.openbao import vault_backend_config

    d = start_daemon(
        tmp_path / "d",
        keys={"default_backend": "bao"},
        backends={"bao": vault_backend_config(openbao_dev)},
    )
    try:
        sock = str(d.socket_path)
        key = f"{unique('bintent')}/k"
        assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201

        def sign(i: int) -> tuple[str, str]:
            rid = f"bao-intent-{i}"
            reply = request(
                sock,
                "POST",
                "/v1/sign",
                {"key": key, "data": "aGk="},
                headers={"X-Request-Id": rid},
            )
            assert reply.status == 200, reply.body
            return rid, reply.json["kid"]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            kids = dict(pool.map(sign, range(16)))
        audit = tmp_path / "d" / "audit"

        def paired() -> bool:
            got: dict[str, list[dict[str, Any]]] = {rid: [] for rid in kids}
            for rec in _records(*sorted(audit.glob("*.jsonl"))):
                if rec.get("request_id") in got:
                    got[rec["request_id"]].append(rec)
            for rid, recs in got.items():
                order = [(r["outcome"], r["kid"]) for r in sorted(recs, key=lambda r: r["seq"])]
                if order != [("intent", kids[rid]), ("ok", kids[rid])]:
                    return False
            return True

        assert wait_until(paired, 10, "intent then ok for every sign")
    finally:
        d.stop()


async def test_an_outcome_joins_the_next_write_or_goes_out_soon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record queued ``submit_later`` makes no write of its own: it goes out with the next
    intent (one fsync for both) or, when none comes, on its own shortly after."""
    import signerd.audit._loopside as trail_module

    fsyncs = _count_fsyncs(monkeypatch)
    monkeypatch.setattr(trail_module, "LATER", 30.0)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    trail.open()
    before = len(fsyncs)
    assert trail.submit_later(_event("first", "ok"))
    await asyncio.sleep(0.3)  # time enough for a write of its own, which must not happen
    assert _records(path) == [] and len(fsyncs) == before
    await trail.ahead(_event("second", "intent")).durable()
    assert [r["request_id"] for r in _records(path)] == ["first", "second"]
    assert len(fsyncs) - before == 1

    monkeypatch.setattr(trail_module, "LATER", 0.05)
    assert trail.submit_later(_event("third", "ok"))
    deadline = time.monotonic() + 5  # the loop runs meanwhile: its timer hands the record over
    while len(_records(path)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert len(_records(path)) == 3, "the outcome was not written on its own"
    await trail.aclose()


async def test_a_full_batch_of_later_records_goes_out_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Records queued ``submit_later`` (a caller verifying in a loop) wait for a timer, up to
    a full batch: the one that fills it hands them all to the writer at once."""
    import signerd.audit._loopside as trail_module
    import signerd.audit._trail as trail_impl

    monkeypatch.setattr(trail_module, "LATER", 30.0)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    trail.open()
    full = trail_impl._MAX_BATCH
    for i in range(full - 1):
        assert trail.submit_later(_event(f"v{i}", "ok"))
    await asyncio.sleep(0.3)
    assert _records(path) == []  # held back for the timer
    assert trail.submit_later(_event("last", "ok"))
    deadline = time.monotonic() + 5
    while len(_records(path)) < full and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [r["request_id"] for r in _records(path)][-1] == "last"
    assert len(_records(path)) == full
    await trail.aclose()


def test_every_verification_in_a_row_is_in_the_trail(tmp_path: Path) -> None:
    """On the daemon: the records of 50 verifications in a row (which join group writes
    rather than making one each) and of a refused one all reach the trail."""
    d = start_daemon(tmp_path / "d", keys={"bootstrap": ["t/k"]})
    try:
        sock = str(d.socket_path)
        signed = request(sock, "POST", "/v1/sign", {"key": "t/k", "data": "aGk="})
        body = {"kid": signed.json["kid"], "data": "aGk=", "signature": signed.json["signature"]}
        for _ in range(50):
            assert request(sock, "POST", "/v1/verify", body).status == 200
        refused = request(sock, "POST", "/v1/verify", {**body, "kid": "t.nope.v1"})
        assert (refused.status, refused.code) == (401, "unknown_kid")

        def verifications() -> list[str]:
            found = [r["outcome"] for r in d.audit_records() if r["operation"] == "verify"]
            return found if len(found) == 51 else []

        outcomes = wait_until(verifications, 10, "every verify's record")
        assert sorted(outcomes) == ["ok"] * 50 + ["unknown_kid"]
    finally:
        d.stop()


async def test_a_written_outcomes_timer_makes_no_write_for_a_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timer of an outcome an intent's write took along does not write the outcome
    queued after it before that one is due (one caller: no extra fsync per answer)."""
    import signerd.audit._loopside as trail_module

    fsyncs: list[float] = []
    real = os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(time.monotonic())
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    monkeypatch.setattr(trail_module, "LATER", 1.0)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    trail.open()
    before = len(fsyncs)
    started = time.monotonic()
    assert trail.submit_later(_event("a", "ok"))  # its timer fires at started + 1.0
    await trail.ahead(_event("b", "intent")).durable()  # takes "a" along
    await asyncio.sleep(0.5)
    assert trail.submit_later(_event("c", "ok"))  # due at started + 1.5 or later
    await asyncio.sleep(max(0.0, started + 1.2 - time.monotonic()))
    assert [r["request_id"] for r in _records(path)] == ["a", "b"]
    assert len(fsyncs) - before == 1
    deadline = time.monotonic() + 10
    while len(_records(path)) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert [r["request_id"] for r in _records(path)] == ["a", "b", "c"]
    assert len(fsyncs) - before == 2
    await trail.aclose()


async def test_grouped_intents_share_one_fsync_and_a_lone_one_is_handed_over_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intents queued with ``group`` in one loop turn go to the disk in one write and one
    fsync; one queued without goes to the writer thread before the loop turns."""
    fsyncs = _count_fsyncs(monkeypatch)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    trail.open()
    before = len(fsyncs)
    pending = [trail.ahead(_event(f"g{i}", "intent"), group=True) for i in range(6)]
    for p in pending:
        await p.durable()
    assert len(fsyncs) - before == 1
    assert [r["request_id"] for r in _records(path)] == [f"g{i}" for i in range(6)]

    lone = trail.ahead(_event("lone", "intent"))
    assert trail._handed  # the writer may take it now, while the caller signs
    await lone.durable()
    await trail.aclose()


def _count_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The fds ``os.fsync`` is called on from now, in order (each call still fsyncs)."""
    fsyncs: list[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        fsyncs.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return fsyncs
