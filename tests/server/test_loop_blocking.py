"""The event loop blocks only inside ``StallGuard.call``: signerd's real request path (a
SoftHSM token, a real audit file) served in this process while blockbuster fails every
other blocking call made on the loop's thread.

The callers are sync clients on other threads, so only the daemon runs on the loop.
Besides blockbuster's own list (sleep, blocking reads and writes, stat, sqlite, a held
lock, ...), a token call (``TokenSession.call``), fsync, opening a file, pread/pwrite and
a waiting flock count as blocking, and so does a write to a regular file even when its
descriptor has O_NONBLOCK (which a disk ignores).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import stat
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blockbuster.blockbuster as bbmod
import pytest
from blockbuster import BlockBuster, BlockBusterFunction, BlockingError

from signerd._config import Config, parse
from signerd.audit import verify_file
from signerd.backends.pkcs11._session import TokenSession
from signerd.client import Client
from signerd.daemon._assemble import Daemon
from signerd.daemon._single import Solo
from signerd.errors import PermissionDenied, SignerdError
from signerd.testing import ALL_OPERATIONS
from signerd.workers import AdminLock, StallGuard, runtime_path

from ..conftest import daemon_config, unique

#: where a blocking call on the loop is the design: the worker's guarded calls
STALL_GUARD_CALL = ("signerd/workers/_stall.py", "call")
#: a worker opens the admin lock's file once (first admin operation after the fork): a
#: file in the runtime directory (tmpfs under systemd); taking the lock itself polls LOCK_NB
ADMIN_LOCK_OPEN = ("signerd/workers/_lock.py", "_descriptor")
#: by design, per connection, in any process: the peer's unit and groups read from
#: /proc/PID (procfs is kernel memory, never a disk), and its user name from NSS
#: (``pwd.getpwuid``: /etc/passwd, or a directory service where one is configured)
PEER_LOOKUP = (("signerd/authz/_peer.py", "_read_proc"), ("signerd/authz/_peer.py", "_user_name"))


class _Seen(BlockingError):
    """blockbuster's error, also kept in ``seen`` (the daemon may turn it into an answer)."""

    seen: list[str] = []

    def __init__(self, func: str) -> None:
        super().__init__(func)
        frames = [f for f in traceback.extract_stack()[:-2] if "blockbuster" not in f.filename]
        where = " <- ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(frames[-10:]))
        self.seen.append(f"{func} at {where}")


def _nonblocking_pipe(fd: int, *_: Any, **__: Any) -> bool:
    """A write or read that cannot wait: O_NONBLOCK on something other than a regular file."""
    return not os.get_blocking(fd) and not stat.S_ISREG(os.fstat(fd).st_mode)


def _flock_nb(fd: int, op: int, *_: Any) -> bool:
    return bool(op & fcntl.LOCK_NB) or op == fcntl.LOCK_UN


def _extra(name: str, **kw: Any) -> BlockBusterFunction:
    return BlockBusterFunction(None, name, **kw)


@contextlib.contextmanager
def loop_must_not_block(
    monkeypatch: pytest.MonkeyPatch, *allowed: tuple[str, str]
) -> Iterator[list[str]]:
    """Every blocking call on a running loop's thread raises BlockingError and is listed,
    except inside the ``allowed`` (file suffix, function name) frames."""
    seen: list[str] = []
    monkeypatch.setattr(_Seen, "seen", seen)
    monkeypatch.setattr(bbmod, "BlockingError", _Seen)
    buster = BlockBuster()
    buster.functions.update(
        {
            "os.fsync": _extra("os.fsync"),
            "os.fdatasync": _extra("os.fdatasync"),
            "os.open": _extra("os.open"),
            "os.pread": _extra("os.pread"),
            "os.pwrite": _extra("os.pwrite"),
            "pwd.getpwuid": _extra("pwd.getpwuid"),
            "fcntl.flock": _extra("fcntl.flock", can_block_predicate=_flock_nb),
            "token": BlockBusterFunction(TokenSession, "call"),  # named "TokenSession.call"
        }
    )
    for name in ("os.read", "os.write"):
        buster.functions[name].can_block_predicate = _nonblocking_pipe
    for function in buster.functions.values():
        for where, what in allowed:
            function.can_block_in(where, what)
    buster.activate()
    try:
        yield seen
    finally:
        buster.deactivate()


class _Worker(Solo):
    """A worker's part in one process: the stall guard (``on_loop``) and the admin lock."""

    def __init__(self, lock: AdminLock) -> None:
        self.lock = lock
        self.admin_guard = lambda key: lock.hold(timeout=10.0)

    def stall_guard(
        self, config: Config, last_answers: Callable[[SignerdError], int]
    ) -> StallGuard | None:
        return StallGuard(last_answers)


def _config(base: Path, tenant: str) -> Config:
    doc = daemon_config(
        base,
        audit={"path": str(base / "audit" / "audit.jsonl"), "fsync": True},
        policy={
            "rules": [
                {
                    "name": "ours",
                    "uids": [os.getuid()],
                    "tenants": [tenant],
                    "operations": list(ALL_OPERATIONS),
                }
            ]
        },
    )
    os.makedirs(base / "run", mode=0o750, exist_ok=True)
    return parse(doc)


def _requests(socket_path: str, tenant: str) -> list[str]:
    """Sign, verify, rotate, sign with the new version, jwks, a refused sign (one client)."""
    key = f"{tenant}/k"
    with Client(socket_path) as client:
        client.create_key(key)
        first = client.sign(key, b"one")
        client.verify(first.kid, b"one", first.signature)
        kid, _ = client.rotate(key)
        second = client.sign(key, b"two")
        assert second.kid == kid != first.kid
        client.verify(first.kid, b"one", first.signature)  # verify-only still verifies
        assert {k["kid"] for k in client.jwks(tenant)} >= {first.kid, kid}
        with pytest.raises(PermissionDenied):
            client.sign(f"{unique('other')}/k", b"refused")
        return [first.kid, kid]


def _burst(socket_path: str, key: str) -> None:
    with Client(socket_path) as client:
        for i in range(5):
            client.sign(key, b"burst %d" % i)


async def _serve(
    tmp_path: Path, role: Solo, monkeypatch: pytest.MonkeyPatch, *allowed: tuple[str, str]
) -> list[str]:
    """The daemon on this loop; one caller's requests, then four callers at once (so a
    worker's records go out both alone on the loop and as a group); what blockbuster saw."""
    tenant = unique("lb")
    config = _config(tmp_path, tenant)
    daemon = await Daemon.start(config, role)
    try:
        with loop_must_not_block(monkeypatch, *allowed) as seen:
            try:
                await asyncio.to_thread(_requests, config.socket, tenant)
                await asyncio.gather(
                    *(asyncio.to_thread(_burst, config.socket, f"{tenant}/k") for _ in range(4))
                )
            except Exception:
                if not seen:  # a failure of its own; else the blocking call is the cause
                    raise
                return seen
    finally:
        await daemon.stop()
    report = verify_file(str(tmp_path / "audit" / "audit.jsonl"))
    assert report.ok, report
    return seen


async def test_single_process_never_blocks_the_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process (token executor, audit writer thread): no blocking call on the loop."""
    seen = await _serve(tmp_path, Solo(), monkeypatch, *PEER_LOOKUP)
    assert seen == [], "\n".join(seen)


async def test_worker_blocks_the_loop_only_inside_stall_guard_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker (``on_loop``): token signs and lone audit writes block the loop, only inside
    ``StallGuard.call``."""
    lock = AdminLock(runtime_path(str(tmp_path / "run" / "signerd.sock"), "admin.lock"))
    try:
        seen = await _serve(
            tmp_path, _Worker(lock), monkeypatch, STALL_GUARD_CALL, ADMIN_LOCK_OPEN, *PEER_LOOKUP
        )
    finally:
        lock.close()
    assert seen == [], "\n".join(seen)


@pytest.mark.parametrize(
    ("also_allowed", "caught"),
    [
        (("signerd/audit/_trail.py", "_write_here"), "TokenSession.call at "),  # signs
        (("signerd/keys/_executors.py", "on"), "_trail.py:_write_here"),  # lone records
    ],
)
async def test_worker_without_the_allowance_is_caught(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    also_allowed: tuple[str, str],
    caught: str,
) -> None:
    """Control: a worker with ``StallGuard.call`` not allowed is caught signing, and writing
    a lone record, on the loop, each inside ``StallGuard.call`` and nowhere else."""
    lock = AdminLock(runtime_path(str(tmp_path / "run" / "signerd.sock"), "admin.lock"))
    with contextlib.closing(lock):
        seen = await _serve(
            tmp_path, _Worker(lock), monkeypatch, ADMIN_LOCK_OPEN, *PEER_LOOKUP, also_allowed
        )
    assert seen, "nothing blocked the loop"
    first = seen[0]  # what follows it is the logging of the error it caused
    assert caught in first and "_stall.py:call" in first, "\n".join(seen)


async def test_fixture_fails_blocking_calls_outside_stall_guard_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: time.sleep and os.fsync on the loop fail; inside StallGuard.call they pass."""
    guard = StallGuard(lambda exc: 0, exit=lambda code: None)
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with loop_must_not_block(monkeypatch, STALL_GUARD_CALL) as seen:
            with pytest.raises(BlockingError):
                time.sleep(0.001)
            with pytest.raises(BlockingError):
                os.fsync(fd)
            guard.call(lambda: time.sleep(0.001), 5.0, "test", SignerdError)
            guard.call(lambda: os.fsync(fd), 5.0, "test", SignerdError)
            await asyncio.to_thread(os.fsync, fd)  # another thread: not the loop's
        assert [line.split(" ", 1)[0] for line in seen] == ["time.sleep", "os.fsync"]
    finally:
        os.close(fd)
        guard.close()
