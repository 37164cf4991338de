"""Calls on a worker's event loop that never return: the stall guard's contract.

Unit tests drive ``StallGuard`` with a fake exit; the daemon test hangs a real
SoftHSM token (another process holds locks on every file of its store, so
``C_Sign`` blocks inside the library) under a two-worker signerd and checks
that the caller gets its 503 by the deadline, the other worker keeps
answering, the stalled worker is replaced and signing works again once the
token answers.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import AuditEvent, AuditTrail, verify_file
from signerd.authz import Peer
from signerd.client import Client
from signerd.errors import AuditUnavailable, BackendUnavailable, SignerdError
from signerd.workers import EXIT_STALLED, StallGuard

from ..conftest import ROOT, SOFTHSM_MODULE, DaemonProcess, start_daemon, unique, wait_until
from ..support.pkcs11_faults import held_token
from ..support.rawhttp import Reply, request

pytestmark = pytest.mark.timeout(120)


class _Exits:
    """Records the guard's exit instead of ending the test process."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.answered: list[SignerdError] = []
        self.done = threading.Event()

    def exit(self, code: int) -> None:
        self.codes.append(code)
        self.done.set()

    def last_answers(self, exc: SignerdError) -> int:
        self.answered.append(exc)
        return 3


def test_a_call_that_returns_in_time_fires_nothing() -> None:
    exits = _Exits()
    guard = StallGuard(exits.last_answers, poll=0.01, exit=exits.exit)
    try:
        for _ in range(50):
            assert guard.call(lambda: 7, 0.2, "token", BackendUnavailable) == 7
        time.sleep(0.3)  # longer than the deadline, with nothing armed
        assert not exits.codes and not guard.fired
    finally:
        guard.close()


def test_an_exception_disarms_the_guard() -> None:
    exits = _Exits()
    guard = StallGuard(exits.last_answers, poll=0.01, exit=exits.exit)
    try:

        def fails() -> None:
            raise ValueError("from the call")

        with pytest.raises(ValueError):
            guard.call(fails, 0.1, "token", BackendUnavailable)
        time.sleep(0.25)
        assert not exits.codes
    finally:
        guard.close()


def test_a_stuck_call_answers_everything_then_exits_and_never_returns_a_result() -> None:
    exits = _Exits()
    guard = StallGuard(exits.last_answers, poll=0.01, exit=exits.exit)
    release = threading.Event()
    outcome: list[object] = []

    def stuck() -> str:
        release.wait(10)
        return "signature"

    def run() -> None:
        try:
            outcome.append(guard.call(stuck, 0.2, "audit", AuditUnavailable))
        except SignerdError as exc:
            outcome.append(exc)

    started = time.monotonic()
    caller = threading.Thread(target=run)
    caller.start()
    assert exits.done.wait(5)
    took = time.monotonic() - started
    assert 0.19 <= took < 1.5
    assert exits.codes == [EXIT_STALLED]
    assert [type(e) for e in exits.answered] == [AuditUnavailable]
    release.set()  # the call comes back late: its result must not be used
    caller.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], AuditUnavailable)


def _event(rid: str) -> AuditEvent:
    return AuditEvent(
        time=time.time(),
        request_id=rid,
        peer=Peer(pid=1, uid=0, gid=0),
        operation="sign",
        outcome="ok",
        tenant="t",
        key="k",
        kid="t/k/v1",
        status=200,
    )


def test_a_lone_record_is_written_on_the_loop_thread_and_a_group_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a guard, a loop turn's lone record is written on the loop's own thread; the
    records of a busier turn go to the writer thread together, as one group."""
    import signerd.audit._trail as audit_module

    exits = _Exits()
    guard = StallGuard(exits.last_answers, poll=0.01, exit=exits.exit)
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), anchor_path=None)
    trail.stall_guard = guard
    writes: list[tuple[str, int]] = []
    real = audit_module.AuditTrail._write_batch

    def spy(self: AuditTrail, batch: list[object]) -> list[bytes]:
        writes.append((threading.current_thread().name, len(batch)))
        return real(self, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_module.AuditTrail, "_write_batch", spy)

    async def main() -> None:
        await asyncio.gather(*(trail.record(_event(f"r{i}")) for i in range(5)))
        await trail.record(_event("r5"))
        await trail.aclose()

    try:
        asyncio.run(main())
    finally:
        guard.close()
    assert writes == [("signerd-audit", 5), ("MainThread", 1)]
    report = verify_file(str(path))
    assert report.ok and report.records == 6
    assert not exits.codes


def test_stall_records_are_written_from_another_thread_and_give_up_on_a_busy_file(
    tmp_path: Path,
) -> None:
    """``write_now`` writes records durably from a thread other than the loop's, and returns
    0 within its timeout, writing nothing, while another thread holds the file."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), anchor_path=None)
    trail.open()
    assert trail.write_now([_event("s1"), _event("s2")], 1.0) == 2
    out: list[tuple[int, float]] = []

    def busy() -> None:
        started = time.monotonic()
        out.append((trail.write_now([_event("s3")], 0.2), time.monotonic() - started))

    with trail._io:  # as the loop's thread does when it is stuck in a write of its own
        other = threading.Thread(target=busy)
        other.start()
        other.join(5)
    asyncio.run(trail.aclose())
    [(written, took)] = out
    assert written == 0 and 0.2 <= took < 1.5, out
    report = verify_file(str(path))
    assert report.ok and report.records == 2, report


def test_stall_records_take_along_the_records_queued_for_a_later_write(tmp_path: Path) -> None:
    """A record queued to join a later write (``submit_later``: a verify's, a sign's outcome)
    waits for a timer of the loop; a loop stuck in a call never runs it, so ``write_now``
    writes what is queued before the stall records, in one write."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path), anchor_path=None)
    trail.open()

    async def stuck() -> int:
        assert trail.submit_later(_event("q1")) and trail.submit_later(_event("q2"))
        return trail.write_now([_event("s1")], 1.0)  # the loop is "stuck" here: no timer ran

    assert asyncio.run(stuck()) == 1
    ids = [json.loads(line)["request_id"] for line in path.read_text().splitlines()]
    assert ids == ["q1", "q2", "s1"]
    asyncio.run(trail.aclose())
    report = verify_file(str(path))
    assert report.ok and report.records == 3, report


# --- a real token that stops answering -------------------------------------------


def _token(base: Path) -> str:
    """A SoftHSM token of this test's own; its SOFTHSM2_CONF path."""
    out = subprocess.run(
        [str(ROOT / "softhsm" / "make-token.sh"), str(base), "stall"],
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip().split("=", 1)[1]


def token_daemon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, timeout: float) -> DaemonProcess:
    """A daemon with 2 workers on a SoftHSM token of this test's own (its store under
    tmp_path/softhsm/tokens, for ``held_token``), with ``timeout`` as the backend timeout."""
    monkeypatch.setenv("SOFTHSM2_CONF", _token(tmp_path / "softhsm"))
    backend = {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": "stall",
        "pin_file": str(tmp_path / "softhsm" / "pin"),
    }
    return start_daemon(
        tmp_path / "d",
        server={"workers": 2},
        keys={"default_backend": "hsm", "refresh_interval": 0, "backend_timeout": timeout},
        backends={"hsm": backend},
    )


@pytest.fixture
def stalling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    d = token_daemon(tmp_path, monkeypatch, 1.0)
    yield d
    d.stop()


def _sign(d: DaemonProcess, key: str) -> tuple[int, str | None, float]:
    started = time.monotonic()
    reply = request(
        str(d.socket_path),
        "POST",
        "/v1/sign",
        {"key": key, "data": base64.b64encode(b"stall").decode()},
        timeout=20,
    )
    return reply.status, reply.code, time.monotonic() - started


def test_a_token_call_that_never_returns_gets_its_503_and_the_worker_is_replaced(
    stalling: DaemonProcess, tmp_path: Path
) -> None:
    """A token call that never returns: 503 within the deadline, that 503 in the audit trail
    (which still verifies), the worker replaced, signing again."""
    d = stalling
    key = f"{unique('stall')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    assert _sign(d, key)[0] == 200
    before = d.worker_pids()
    with held_token(tmp_path / "softhsm" / "tokens"):
        status, code, took = _sign(d, key)
        assert (status, code) == (503, "backend_unavailable")
        assert 0.9 <= took < 3.0, took  # backend_timeout is 1 s
        # the other worker keeps answering while the stalled one is replaced
        health = request(str(d.socket_path), "GET", "/v1/health", timeout=5)
        assert health.status == 200
        wait_until(lambda: "signerd.worker_stalled call=token" in d.log_text(), 10, "the log line")
    wait_until(
        lambda: len(d.worker_pids() - before) >= 1 and len(d.worker_pids()) == 2, 30, "a new worker"
    )
    assert f"code={EXIT_STALLED}" in d.log_text()
    assert d.proc.poll() is None
    for _ in range(6):  # over fresh connections, so both workers sign
        assert _sign(d, key)[0] == 200
    # the guard's 503 is in the audit trail, written before the worker ended
    stalled = [r for r in d.audit_records() if r.get("reason") == "worker_stalled"]
    assert len(stalled) == 1, stalled
    assert (stalled[0]["outcome"], stalled[0]["status"], stalled[0]["key"]) == (
        "backend_unavailable",
        503,
        key,
    ), stalled
    assert "signerd.worker_stalled_records written=1 of=1" in d.log_text()
    for path in d.audit_files():
        assert verify_file(str(path)).ok, path


# --- an admin operation in flight when the guard fires ------------------------------------


@pytest.fixture
def frozen_audit(tmp_path: Path) -> Iterator[tuple[DaemonProcess, Path]]:
    """Two workers whose audit files are on a file system the test can freeze."""
    from ..authz.test_matrix import loop_fs

    with loop_fs(tmp_path) as mnt:
        d = start_daemon(
            tmp_path / "d",
            server={"workers": 2},
            audit={
                "path": str(mnt / "audit.jsonl"),
                "fsync": True,
                "write_timeout": 0.5,
                "anchor_interval": 3600,
            },
        )
        try:
            yield d, mnt
        finally:
            _freeze(mnt, False)
            d.stop()


def _freeze(mnt: Path, on: bool) -> None:
    flag = "--freeze" if on else "--unfreeze"
    subprocess.run(["fsfreeze", flag, str(mnt)], capture_output=True, check=on)


def _rotate_intent(d: DaemonProcess, key: str) -> bool:
    needle = f'"key":"{key}"'.encode()
    return any(
        b'"operation":"rotate","outcome":"intent"' in line and needle in line
        for p in d.audit_files()
        for line in p.read_bytes().splitlines()
    )


def _rotate(d: DaemonProcess, key: str, idem: str) -> Reply | None:
    try:
        return request(
            str(d.socket_path),
            "POST",
            f"/v1/keys/{key}/rotate",
            {},
            headers={"Idempotency-Key": idem},
            timeout=20,
        )
    except OSError:  # a worker that is going away
        return None


@pytest.mark.parametrize("via", ["http", "client"])
def test_a_rotate_whose_outcome_record_stalls_is_outcome_unknown_and_rotates_once(
    frozen_audit: tuple[DaemonProcess, Path], via: str
) -> None:
    """A rotate whose outcome record stalls past audit.write_timeout after the change (the
    audit file system frozen): the stall guard answers 500 outcome_unknown, not
    audit_unavailable, and no Retry-After; retries with the same Idempotency-Key over fresh
    connections answer the version it made; one new version in all, named by the trail.
    Through the client library, rotate() returns that version after its own retry."""
    d, mnt = frozen_audit
    key = f"{unique('stallrot')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    other = min(d.worker_pids())
    idem = unique("stall-key")
    results: list[Any] = []

    def call() -> None:
        if via == "http":
            results.append(_rotate(d, key, idem))
            return
        with Client(d.socket_path, timeout=20) as client:
            results.append(client.rotate(key))

    # stopped, the other worker delays the change notice's ack by a second: the rotate is
    # then past its change and before its outcome record when the file system freezes
    os.kill(other, signal.SIGSTOP)
    caller = threading.Thread(target=call)
    try:
        caller.start()
        wait_until(lambda: _rotate_intent(d, key), 10, "the intent record", interval=0.002)
        _freeze(mnt, True)
        wait_until(lambda: "signerd.worker_stalled call=audit" in d.log_text(), 10, "the guard")
    finally:
        _freeze(mnt, False)
        os.kill(other, signal.SIGCONT)
    caller.join(60)
    new_kid = f"{key.replace('/', '.')}.v2"
    if via == "http":
        first = results[0]
        assert first is not None and (first.status, first.code) == (500, "outcome_unknown")
        assert "retry-after" not in first.headers
        answered = 0
        for _ in range(40):  # fresh connections, whichever worker takes them
            again = _rotate(d, key, idem)
            if again is None:
                time.sleep(0.1)
                continue
            assert again.status == 200 and again.headers["idempotent-replayed"] == "true"
            assert again.json["kid"] == new_kid
            answered += 1
            if answered == 6:
                break
        assert answered == 6
    else:
        kid, described = results[0]
        assert kid == new_kid and [v.version for v in described.versions] == [1, 2]
    info = request(str(d.socket_path), "GET", f"/v1/keys/{key}").json
    assert [v["version"] for v in info["versions"]] == [1, 2]
    named = [r for r in d.audit_records() if r.get("kid") == new_kid]
    assert any(r["operation"] == "rotate" and r["outcome"] == "replayed" for r in named), named


def test_a_change_whose_outcome_record_fails_is_outcome_unknown(tmp_path: Path) -> None:
    """One process, no stall guard: a rotate held in the token while the audit file system
    freezes has made its version when its outcome record fails after write_timeout; the
    answer is 500 outcome_unknown (never audit_unavailable), and the version is there."""
    from ..authz.test_matrix import loop_fs

    env_before = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = _token(tmp_path / "softhsm")
    backend = {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": "stall",
        "pin_file": str(tmp_path / "softhsm" / "pin"),
    }
    try:
        with loop_fs(tmp_path) as mnt:
            d = start_daemon(
                tmp_path / "d",
                server={"workers": 1},
                keys={"default_backend": "hsm", "refresh_interval": 0, "backend_timeout": 10.0},
                backends={"hsm": backend},
                audit={"path": str(mnt / "audit.jsonl"), "fsync": True, "write_timeout": 0.5},
            )
            try:
                _outcome_record_fails(d, mnt, tmp_path)
            finally:
                _freeze(mnt, False)
                d.stop()
    finally:
        if env_before is not None:
            os.environ["SOFTHSM2_CONF"] = env_before


def _outcome_record_fails(d: DaemonProcess, mnt: Path, tmp_path: Path) -> None:
    key = f"{unique('recfail')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    results: list[Reply] = []
    caller = threading.Thread(
        target=lambda: results.append(
            request(str(d.socket_path), "POST", f"/v1/keys/{key}/rotate", {}, timeout=30)
        )
    )
    with held_token(tmp_path / "softhsm" / "tokens"):
        caller.start()
        wait_until(lambda: _rotate_intent(d, key), 10, "the intent record")
        time.sleep(0.2)  # the rotate is waiting for the token
        _freeze(mnt, True)
    caller.join(30)
    _freeze(mnt, False)
    assert (results[0].status, results[0].code) == (500, "outcome_unknown"), results[0].body
    info = request(str(d.socket_path), "GET", f"/v1/keys/{key}").json
    assert [v["version"] for v in info["versions"]] == [1, 2]
    assert "signerd.admin_outcome_unknown" in d.log_text()
