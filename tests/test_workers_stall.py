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
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd._audit import AuditTrail, verify_file
from signerd._calls import AuditEvent, Peer
from signerd.errors import AuditUnavailable, BackendUnavailable, SignerdError
from signerd.workers import EXIT_STALLED, StallGuard

from ._rawhttp import request
from .conftest import ROOT, SOFTHSM_MODULE, DaemonProcess, start_daemon, unique, wait_until

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
    import signerd._audit as audit_module

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


_HOLD = """
import fcntl, os, sys
fds = []
for root, _, names in os.walk(sys.argv[1]):
    for name in names:
        if name.endswith((".object", ".lock")):
            fd = os.open(os.path.join(root, name), os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            fds.append(fd)
print(len(fds), flush=True)
sys.stdin.read()
"""


@pytest.fixture
def stalling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonProcess]:
    monkeypatch.setenv("SOFTHSM2_CONF", _token(tmp_path / "softhsm"))
    backend = {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": "stall",
        "pin_file": str(tmp_path / "softhsm" / "pin"),
    }
    d = start_daemon(
        tmp_path / "d",
        server={"workers": 2},
        keys={"default_backend": "hsm", "refresh_interval": 0, "backend_timeout": 1.0},
        backends={"hsm": backend},
    )
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
    d = stalling
    key = f"{unique('stall')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    assert _sign(d, key)[0] == 200
    before = d.worker_pids()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "softhsm" / "tokens")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and int(holder.stdout.readline()) > 0
        status, code, took = _sign(d, key)
        assert (status, code) == (503, "backend_unavailable")
        assert 0.9 <= took < 3.0, took  # backend_timeout is 1 s
        # the other worker keeps answering while the stalled one is replaced
        health = request(str(d.socket_path), "GET", "/v1/health", timeout=5)
        assert health.status == 200
        wait_until(lambda: "signerd.worker_stalled call=token" in d.log_text(), 10, "the log line")
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    wait_until(
        lambda: len(d.worker_pids() - before) >= 1 and len(d.worker_pids()) == 2, 30, "a new worker"
    )
    assert f"code={EXIT_STALLED}" in d.log_text()
    assert d.proc.poll() is None
    for _ in range(6):  # over fresh connections, so both workers sign
        assert _sign(d, key)[0] == 200
