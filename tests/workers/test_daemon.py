"""The multi-worker daemon: N worker processes on one socket under the supervisor.

Every test starts a real signerd (SoftHSM) with ``server.workers = 2`` and
talks to it over fresh connections, so the kernel spreads them over the workers.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import (
    DaemonProcess,
    daemon_config,
    policy_allow_all,
    start_daemon,
    to_toml,
    unique,
    wait_until,
)
from ..support.rawhttp import Reply, request

pytestmark = pytest.mark.timeout(180)

WORKERS = {"workers": 2}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _sign(d: DaemonProcess, key: str, data: bytes = b"x", rid: str | None = None) -> Reply:
    headers = {"X-Request-Id": rid} if rid else None
    return request(
        str(d.socket_path),
        "POST",
        "/v1/sign",
        {"key": key, "data": b64(data)},
        headers=headers,
        timeout=10,
    )


def _by_worker(d: DaemonProcess, operation: str = "sign") -> dict[str, int]:
    """How many records of ``operation`` each worker's audit file holds."""
    counts: dict[str, int] = {}
    for path in d.audit_files():
        lines = path.read_bytes().splitlines()
        counts[path.name] = sum(1 for x in lines if f'"operation":"{operation}"'.encode() in x)
    return counts


def _spread(d: DaemonProcess, key: str, n: int = 64, threads: int = 8) -> list[Reply]:
    """``n`` signs over fresh connections from ``threads`` threads at once."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda i: _sign(d, key, f"s{i}".encode()), range(n)))


@pytest.fixture
def workers2(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path / "d", server=WORKERS)
    yield d
    d.stop()


def test_every_worker_serves_and_ready_comes_last(workers2: DaemonProcess) -> None:
    """Two workers run under the supervisor, both answer signs, signerd.ready follows both."""
    d = workers2
    assert len(d.worker_pids()) == 2
    log = d.log_text()
    ready = log.index("signerd.ready")
    assert log.count("signerd.worker_serving") == 2
    assert all(i < ready for i in _indices(log, "signerd.worker_ready"))
    key = f"{unique('wk')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    for _ in range(5):
        assert all(r.status == 200 for r in _spread(d, key))
        counts = _by_worker(d)
        if len([c for c in counts.values() if c]) == 2:
            break
    assert sorted(counts) == ["audit.w0.jsonl", "audit.w1.jsonl"] and all(counts.values()), counts


def test_connections_opened_at_once_are_spread_over_the_workers(workers2: DaemonProcess) -> None:
    """32 connections opened at once, as a client's pool opens them, end up about half on
    each worker, not all on whichever woke first: each signs once on its connection, and
    each worker's audit file holds its share of the records."""
    d = workers2
    key = f"{unique('spread')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    before = _intents(d)
    socks = []
    try:
        for _ in range(32):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect(str(d.socket_path))
            socks.append(sock)
        for i, sock in enumerate(socks):  # all open before any request: no reuse, no luck
            body = json.dumps({"key": key, "data": b64(f"c{i}".encode())}).encode()
            head = (
                "POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body)
        assert all(_status(sock) == 200 for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    after = _intents(d)
    shares = sorted(after[name] - before.get(name, 0) for name in after)
    assert sum(shares) == 32 and shares[0] >= 10, shares


def _intents(d: DaemonProcess) -> dict[str, int]:
    """How many sign intent records (durable before each answer) each worker's file holds."""
    return {
        path.name: sum(
            1
            for x in path.read_bytes().splitlines()
            if b'"operation":"sign"' in x and b'"outcome":"intent"' in x
        )
        for path in d.audit_files()
    }


def _status(sock: socket.socket) -> int:
    """The status of the one answer on ``sock`` (read whole)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(
        next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length:"))[15:]
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside an answer"
        rest += chunk
    return int(head.split(b" ", 2)[1])


def _indices(text: str, needle: str) -> list[int]:
    out, at = [], text.find(needle)
    while at >= 0:
        out.append(at)
        at = text.find(needle, at + 1)
    return out


def test_sign_after_rotation_through_another_worker_uses_new_version(
    workers2: DaemonProcess,
) -> None:
    """After a rotation on one worker, signs over many fresh connections all use the new kid."""
    d = workers2
    key = f"{unique('rot')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    old = {r.json["kid"] for r in _spread(d, key)}  # both workers now cache version 1
    assert len(old) == 1, old
    for round_ in range(3):
        rotated = request(str(d.socket_path), "POST", f"/v1/keys/{key}/rotate", {})
        assert rotated.status == 200, rotated.body
        new = rotated.json["kid"]
        time.sleep(0.2)  # the notice reaches the other worker in milliseconds
        kids = [r.json["kid"] for r in _spread(d, key, n=40)]
        assert set(kids) == {new}, (round_, new, sorted(set(kids)))


def test_concurrent_admin_operations_are_serialised(workers2: DaemonProcess) -> None:
    """Ten rotations of one key at once over both workers: all succeed, ten distinct versions."""
    d = workers2
    key = f"{unique('adm')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        replies = list(
            pool.map(
                lambda _: request(str(d.socket_path), "POST", f"/v1/keys/{key}/rotate", {}),
                range(10),
            )
        )
    assert [r.status for r in replies] == [200] * 10, [r.body for r in replies]
    kids = sorted(r.json["kid"] for r in replies)
    assert len(set(kids)) == 10
    info = request(str(d.socket_path), "GET", f"/v1/keys/{key}").json
    assert [v["version"] for v in info["versions"]] == list(range(1, 12))
    assert sum(1 for v in info["versions"] if v["state"] == "active") == 1


def test_kill_9_of_a_worker_mid_load_loses_no_acknowledged_record(
    workers2: DaemonProcess,
) -> None:
    """SIGKILL of a worker under load: it is replaced, others serve, every 200 has its
    durable record (its intent, and its outcome unless the kill came first)."""
    d = workers2
    key = f"{unique('k9')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    before = d.worker_pids()
    assert len(before) == 2
    acknowledged: list[str] = []
    after_kill: list[str] = []
    killed = threading.Event()
    until = time.monotonic() + 4.0

    def caller(n: int) -> None:
        i = 0
        while time.monotonic() < until:
            rid = f"k9-{n}-{i}"
            i += 1
            try:
                reply = _sign(d, key, rid.encode(), rid=rid)
            except OSError:
                continue  # the killed worker's connections break; that is allowed
            if reply.status == 200:
                acknowledged.append(rid)
                if killed.is_set():
                    after_kill.append(rid)

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    killed.set()
    for t in threads:
        t.join(timeout=30)
    assert after_kill, "the other worker kept serving"
    wait_until(
        lambda: len(d.worker_pids()) == 2 and victim not in d.worker_pids(), 30, "a new worker"
    )
    assert d.proc.poll() is None
    # a sign's intent record is durable before its answer leaves; its outcome follows with
    # the next write, so the killed worker's last outcomes may be missing (an intent without
    # an outcome reads "a signature may have been made")
    audited = {r["request_id"] for r in d.audit_records() if r.get("outcome") in ("ok", "intent")}
    missing = [rid for rid in acknowledged if rid not in audited]
    assert not missing, missing[:10]
    assert "signerd.worker_exited" in d.log_text()
    assert _sign(d, key).status == 200


def _policy(verify: bool) -> dict[str, Any]:
    policy = policy_allow_all()
    ops = policy["rules"][0]["operations"]
    policy["rules"][0]["operations"] = [o for o in ops if verify or o != "verify"]
    return policy


def test_sighup_reloads_the_policy_in_every_worker(tmp_path: Path) -> None:
    """SIGHUP to the supervisor: every worker applies the new policy (verify becomes granted)."""
    d = start_daemon(tmp_path / "d", server=WORKERS, policy=_policy(verify=False))
    try:
        key = f"{unique('hup')}/k"
        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        signed = _sign(d, key, b"hello").json
        body = {"kid": signed["kid"], "data": b64(b"hello"), "signature": signed["signature"]}

        def verify_all() -> list[int]:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                return list(
                    pool.map(
                        lambda _: request(str(d.socket_path), "POST", "/v1/verify", body).status,
                        range(32),
                    )
                )

        assert set(verify_all()) == {403}
        doc = daemon_config(d.dir, server=WORKERS, policy=_policy(verify=True))
        d.config_path.write_text(to_toml(doc))
        d.sighup()
        wait_until(lambda: d.log_text().count("signerd.policy_reloaded") == 2, 10, "two reloads")
        assert set(verify_all()) == {200}
        assert d.proc.poll() is None and len(d.worker_pids()) == 2
    finally:
        d.stop()


def test_sigterm_stops_every_worker_and_the_trail_verifies(workers2: DaemonProcess) -> None:
    """SIGTERM: all workers stop, exit 0, the socket is removed, the per-worker trail verifies."""
    d = workers2
    key = f"{unique('term')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    assert all(r.status == 200 for r in _spread(d, key, n=32))
    pids = d.worker_pids()
    assert d.stop() == 0, d.log_text()[-3000:]
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert not d.socket_path.exists()
    out = subprocess.run(
        [sys.executable, "-m", "signerd.cli", "audit", "verify", str(d.audit_path.parent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in d.log_text()


def test_rate_limit_holds_across_workers(tmp_path: Path) -> None:
    """A caller spread over both workers gets its rate once, not once per worker."""
    policy = policy_allow_all()
    policy["rules"][0].update(rate=1.0, burst=10)
    d = start_daemon(tmp_path / "d", server=WORKERS, policy=policy)
    try:
        key = f"{unique('rl')}/k"
        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        started = time.monotonic()
        replies = _spread(d, key, n=60, threads=8)
        elapsed = time.monotonic() - started
        ok = sum(1 for r in replies if r.status == 200)
        limited = sum(1 for r in replies if r.code == "rate_limited")
        assert ok + limited == 60
        # the create took one token; the rest of the burst plus what refilled meanwhile
        assert ok <= 9 + elapsed * 1.0 + 1, (ok, elapsed)
        assert ok >= 5
        assert len([c for c in _by_worker(d).values() if c]) == 2, _by_worker(d)
    finally:
        d.stop()


def test_wrong_pin_in_a_worker_exits_78_without_restarts(tmp_path: Path) -> None:
    """A PIN the token refuses: one login attempt, the worker exits 78 and so does the
    supervisor, no restart loop."""
    pin = tmp_path / "wrong-pin"
    pin.write_text("999999\n")
    base = tmp_path / "d"
    with pytest.raises(RuntimeError, match="exited with 78") as info:
        start_daemon(base, server=WORKERS, backends={"hsm": _backend(pin_file=str(pin))})
    text = str(info.value)
    assert text.count("signerd.worker_started") == 1, text
    assert "configuration error" in text and "999999" not in text
    # one login attempt, named in the log: never retried into a locked PIN
    assert text.count("signerd.pkcs11.login_failed error=PinIncorrect") == 1, text


def _backend(**changes: Any) -> dict[str, Any]:
    from ..conftest import pkcs11_backend_config

    return {**pkcs11_backend_config(), **changes}


def test_one_worker_is_one_process_with_one_audit_file(tmp_path: Path) -> None:
    """server.workers = 1: no supervisor, no worker processes, the trail is audit.jsonl itself."""
    d = start_daemon(tmp_path / "d", server={"workers": 1})
    try:
        key = f"{unique('one')}/k"
        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        assert _sign(d, key).status == 200
        assert d.worker_pids() == set()
        assert [p.name for p in d.audit_files()] == ["audit.jsonl"]
    finally:
        assert d.stop() == 0


# --- admin requests with an Idempotency-Key, across workers ------------------------------


def _rotate(d: DaemonProcess, key: str, idem: str | None, timeout: float = 30) -> Reply:
    headers = {"Idempotency-Key": idem} if idem else None
    return request(
        str(d.socket_path), "POST", f"/v1/keys/{key}/rotate", {}, headers=headers, timeout=timeout
    )


def _versions(d: DaemonProcess, key: str) -> list[int]:
    info = request(str(d.socket_path), "GET", f"/v1/keys/{key}").json
    return [v["version"] for v in info["versions"]]


def _store(d: DaemonProcess) -> sqlite3.Connection:
    """The daemon's Idempotency-Key store (in the runtime directory, the socket's)."""
    return sqlite3.connect(str(d.socket_path.parent / ".signerd-idempotency.db"), timeout=5)


def test_one_key_sent_at_once_over_both_workers_rotates_once(workers2: DaemonProcess) -> None:
    """Twelve rotates with one Idempotency-Key at once over fresh connections (both workers):
    one acts, the eleven others wait for it and answer its answer again; one new version."""
    d = workers2
    for _ in range(3):
        key = f"{unique('burst')}/k"
        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        idem = unique("burst-key")
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(_rotate, [d] * 12, [key] * 12, [idem] * 12))
        assert [r.status for r in replies] == [200] * 12, [r.body for r in replies]
        assert len({r.body for r in replies}) == 1
        replayed = [r for r in replies if r.headers.get("idempotent-replayed") == "true"]
        assert len(replayed) == 11
        assert _versions(d, key) == [1, 2]
        files = {
            p.name
            for p in d.audit_files()
            for line in p.read_bytes().splitlines()
            if b'"outcome":"replayed"' in line and key.encode() in line
        }
        if len(files) == 2:  # replays were answered by both workers
            return
    pytest.fail("the kernel never spread the burst over both workers")


def _orphan(d: DaemonProcess, rid: str, before: dict[str, Any] | None = None) -> None:
    """Make a stored answer an intent without an outcome, as when its worker dies mid-change."""
    with contextlib.closing(_store(d)) as db, db:
        row = db.execute("SELECT before FROM entries WHERE request_id = ?", (rid,)).fetchone()
        assert row is not None, "the rotate's key is stored"
        before_text = row[0] if before is None else json.dumps(before)
        db.execute(
            "UPDATE entries SET status = NULL, body = NULL, kid = NULL, before = ? "
            "WHERE request_id = ?",
            (before_text, rid),
        )


def test_an_unfinished_rotate_found_made_answers_its_retry(workers2: DaemonProcess) -> None:
    """A rotate whose worker died after the change, before its answer was stored: its retry
    reads the key, finds the version it made, answers it (replayed) and rotates no more."""
    d = workers2
    key = f"{unique('made')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    idem = unique("made-key")
    first = _rotate(d, key, idem)
    assert first.status == 200
    rid = first.headers["x-request-id"]
    _orphan(d, rid)
    again = _rotate(d, key, idem)
    assert again.status == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json["kid"] == first.json["kid"]
    assert _versions(d, key) == [1, 2]
    wait_until(
        lambda: f"admin_outcome_settled request_id={rid} operation=rotate made=yes" in d.log_text(),
        5,
        "the settle line",
    )


def test_an_unfinished_rotate_not_made_is_done_once_by_its_retry(
    workers2: DaemonProcess,
) -> None:
    """A rotate whose worker died before the change: another rotate of the key meanwhile is
    not taken for it; its retry then rotates (once), and a further retry replays that."""
    d = workers2
    key = f"{unique('notmade')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    idem = unique("notmade-key")
    first = _rotate(d, key, idem)
    assert first.status == 200 and first.json["kid"].endswith(".v2")
    rid = first.headers["x-request-id"]
    _orphan(d, rid, {"last": 2})  # it was about to make version 3, and died
    meanwhile = _rotate(d, key, None)
    assert meanwhile.status == 200 and meanwhile.json["kid"].endswith(".v3")
    retry = _rotate(d, key, idem)
    assert retry.status == 200 and "idempotent-replayed" not in retry.headers
    assert retry.json["kid"].endswith(".v4")
    again = _rotate(d, key, idem)
    assert again.headers["idempotent-replayed"] == "true" and again.json == retry.json
    assert _versions(d, key) == [1, 2, 3, 4]
    assert f"admin_outcome_settled request_id={rid} operation=rotate made=no" in d.log_text()


def test_kill_9_of_the_rotating_worker_then_the_retry_rotates_once(
    workers2: DaemonProcess,
) -> None:
    """SIGKILL of the worker acting on a rotate (right after its intent record): no answer;
    the retry with the same Idempotency-Key, on the other worker, ends with one new version."""
    d = workers2
    key = f"{unique('k9rot')}/k"
    assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
    stopped, acting = sorted(d.worker_pids())
    idem = unique("k9-key")
    answers: list[Reply | OSError] = []
    os.kill(stopped, signal.SIGSTOP)  # every connection goes to the other worker
    try:
        # SIGSTOP takes effect asynchronously: a worker still running for a moment could
        # take the next connection and sit on it while stopped
        wait_until(lambda: _stopped(stopped), 10, "the worker stopped", interval=0.002)
        thread = threading.Thread(target=lambda: answers.append(_try_rotate(d, key, idem)))
        thread.start()
        wait_until(lambda: _intent_written(d, key), 10, "the intent record", interval=0.002)
        os.kill(acting, signal.SIGKILL)
        thread.join(30)
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert len(answers) == 1 and isinstance(answers[0], OSError), answers
    final = None
    for _ in range(20):  # until a worker takes it (the supervisor starts a new one)
        reply = _try_rotate(d, key, idem)
        if isinstance(reply, Reply) and reply.status == 200:
            final = reply
            break
        time.sleep(0.2)
    assert final is not None
    assert _versions(d, key) == [1, 2]
    assert final.json["kid"] == f"{key.replace('/', '.')}.v2"
    assert _rotate(d, key, idem).json == final.json


def _try_rotate(d: DaemonProcess, key: str, idem: str) -> Reply | OSError:
    try:
        return _rotate(d, key, idem, timeout=15)
    except OSError as exc:  # http.client's RemoteDisconnected is an OSError too
        return exc


def _stopped(pid: int) -> bool:
    """Whether every thread of ``pid`` is stopped (state T in /proc)."""
    states = [
        stat.read_text().rsplit(")", 1)[1].split()[0]
        for stat in Path(f"/proc/{pid}/task").glob("*/stat")
    ]
    return bool(states) and all(state == "T" for state in states)


def _intent_written(d: DaemonProcess, key: str) -> bool:
    needle = f'"key":"{key}"'.encode()
    return any(
        b'"operation":"rotate","outcome":"intent"' in line and needle in line
        for p in d.audit_files()
        for line in p.read_bytes().splitlines()
    )
