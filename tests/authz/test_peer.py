"""Caller identity from the kernel: real connections from child processes of other users and units."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.authz import peer_of, unit_from_cgroup
from signerd.daemon._sockets import bind_unix_socket

from ..conftest import CHILD_PYTHON, NOBODY, NOGROUP, USERS_GID

pytestmark = pytest.mark.timeout(60)


CLIENT = r"""
import socket, sys
sys.stdin.readline()                      # wait for "go"
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("error", exc.errno, flush=True)
    sys.exit(3)
print("connected", flush=True)
sys.stdin.readline()                      # stay connected until told to go
"""


class Client:
    """A child process that connects to a Unix socket when told to, as any user."""

    def __init__(self, path: str, **popen: object) -> None:
        self.proc: subprocess.Popen[str] = subprocess.Popen(
            [CHILD_PYTHON, "-c", CLIENT, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            **popen,  # type: ignore[call-overload]
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def connect(self) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def finish(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                assert self.proc.stdin is not None
                self.proc.stdin.write("bye\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def listener(shared_tmp: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(shared_tmp / "run" / "s.sock")
    sock = bind_unix_socket(path, mode=0o666, dir_mode=0o755)
    sock.settimeout(10)
    try:
        yield path, sock
    finally:
        sock.close()


@contextlib.contextmanager
def unit_cgroup(name: str) -> Iterator[Path]:
    """A real cgroup named like a systemd system unit, in the legacy name=systemd hierarchy."""
    root = Path("/sys/fs/cgroup/systemd")
    if not (root / "cgroup.procs").exists():
        root = Path("/sys/fs/cgroup")  # unified hierarchy only
    group = root / "system.slice" / name
    group.mkdir(parents=True)
    try:
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            group.parent.rmdir()


def test_peer_is_this_process(listener: tuple[str, socket.socket]) -> None:
    """A connection from this process reports our pid, uid, gid and user name."""
    path, sock = listener
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        conn, _ = sock.accept()
        with conn:
            peer = peer_of(conn)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer.user == "root"
    assert peer.groups == tuple(sorted(set(os.getgroups())))


def test_peer_of_a_child_running_as_nobody(listener: tuple[str, socket.socket]) -> None:
    """A client spawned as nobody:nogroup with an extra group is seen with exactly those ids."""
    path, sock = listener
    client = Client(path, user="nobody", group="nogroup", extra_groups=[USERS_GID])
    try:
        assert client.connect() == "connected"
        conn, _ = sock.accept()
        with conn:
            peer = peer_of(conn)
    finally:
        client.finish()
    assert (peer.pid, peer.uid, peer.gid) == (client.pid, NOBODY, NOGROUP)
    assert peer.user == "nobody"
    assert peer.groups == (USERS_GID,)
    assert peer.unit is None


def test_peer_unit_from_a_real_cgroup(listener: tuple[str, socket.socket]) -> None:
    """A client placed in system.slice/<unit>.service is reported with that unit."""
    path, sock = listener
    unit = f"gwtest{os.getpid()}.service"
    with unit_cgroup(unit) as group:
        client = Client(path, user="nobody", group="nogroup")
        try:
            (group / "cgroup.procs").write_text(str(client.pid))
            assert client.connect() == "connected"
            conn, _ = sock.accept()
            with conn:
                peer = peer_of(conn)
        finally:
            client.finish()
    assert peer.unit == unit
    assert (peer.pid, peer.uid) == (client.pid, NOBODY)


@pytest.mark.parametrize("reaped", [False, True])
def test_exited_peer_has_no_unit(listener: tuple[str, socket.socket], reaped: bool) -> None:
    """If the caller exited before the lookup (its pid may be reused), the unit is not trusted."""
    path, sock = listener
    unit = f"gwgone{os.getpid()}{int(reaped)}.service"
    with unit_cgroup(unit) as group:
        client = Client(path, user="nobody", group="nogroup")
        (group / "cgroup.procs").write_text(str(client.pid))
        assert client.connect() == "connected"
        conn, _ = sock.accept()
        with conn:
            assert client.proc.stdin is not None
            client.proc.stdin.write("bye\n")
            client.proc.stdin.flush()
            deadline = time.monotonic() + 5
            if reaped:
                client.proc.wait(timeout=5)
            else:  # a zombie: exited, not yet waited for
                while time.monotonic() < deadline:
                    with open(f"/proc/{client.pid}/stat") as stat:
                        if stat.read().split(") ", 1)[1].startswith("Z"):
                            break
                    time.sleep(0.01)
            peer = peer_of(conn)
        client.finish()
    assert peer.unit is None
    assert (peer.pid, peer.uid, peer.gid) == (client.pid, NOBODY, NOGROUP)


def spawn_with_pid(pid: int, argv: list[str], **popen: object) -> subprocess.Popen[bytes]:
    """Start a process that gets ``pid`` (free again after its owner was reaped)."""
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as last:
            last.write(str(pid - 1))
        proc = subprocess.Popen(argv, **popen)  # type: ignore[call-overload]
        if proc.pid == pid:
            return proc  # type: ignore[no-any-return]
        proc.kill()
        proc.wait()
    pytest.fail(f"could not get pid {pid} again")


def test_reused_pid_does_not_lend_its_unit(listener: tuple[str, socket.socket]) -> None:
    """A caller that exits and whose pid goes to a process of a unit is not seen in that unit.

    The impostor runs as the same user, so only the kernel-bound pidfd tells them apart.
    """
    path, sock = listener
    unit = f"gwimpostor{os.getpid()}.service"
    client = Client(path, user="nobody", group="nogroup")
    assert client.connect() == "connected"
    conn, _ = sock.accept()
    client.finish()  # exits and is reaped: its pid is free
    with unit_cgroup(unit) as group, conn:
        impostor = spawn_with_pid(client.pid, ["sleep", "30"], user="nobody", group="nogroup")
        try:
            (group / "cgroup.procs").write_text(str(impostor.pid))
            with open(f"/proc/{client.pid}/cgroup") as cgroup:
                assert unit_from_cgroup(cgroup.read()) == unit  # a naive lookup is fooled
            peer = peer_of(conn)
        finally:
            impostor.kill()
            impostor.wait()
    assert peer.unit is None
    assert (peer.pid, peer.uid) == (client.pid, NOBODY)


def test_the_caller_cannot_choose_its_identity(listener: tuple[str, socket.socket]) -> None:
    """Whatever a client writes on the socket, the peer is what the kernel recorded."""
    path, sock = listener
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        client.sendall(b"GET / HTTP/1.1\r\nX-Uid: 0\r\nX-Unit: gateway.service\r\n\r\n")
        conn, _ = sock.accept()
        with conn:
            peer = peer_of(conn)
    assert peer.unit is None and peer.uid == os.getuid()


@pytest.mark.parametrize(
    ("text", "unit"),
    [
        ("0::/system.slice/gateway.service\n", "gateway.service"),
        ("0::/system.slice/system-gateway.slice/gateway@eu.service\n", "gateway@eu.service"),
        ("0::/custom.slice/gateway.service/worker\n", "gateway.service"),  # delegated sub-cgroup
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/gateway.service\n",
         "user@1000.service"),  # a user's own unit named like a system one is not that unit
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        ("0::/init.scope\n", "init.scope"),
        ("0::/\n", None),
        ("0::/system.slice\n", None),
        ("0::/machine.slice/libpod-abc.scope/container\n", "libpod-abc.scope"),
        ("0::/lxc.payload/gateway.service\n", None),  # not a unit where a unit belongs
        ("12:pids:/\n1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service"),
        ("1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n", "b.service"),
        ("0::/system.slice/gate way.service\n", None),
        ("", None),
    ],
)  # fmt: skip
def test_unit_from_cgroup(text: str, unit: str | None) -> None:
    """The unit is the first component after the slices, as systemd itself reads it."""
    assert unit_from_cgroup(text) == unit
