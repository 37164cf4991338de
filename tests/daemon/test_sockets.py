"""The listening socket: private directory, mode and group, and the paths signerd refuses."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.daemon._sockets import SocketError, bind_unix_socket, unlink_own_socket

from ..authz.test_peer import Client
from ..conftest import NOGROUP

pytestmark = pytest.mark.timeout(60)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def bound() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


def test_creates_private_directory_and_socket(tmp_path: Path, bound: list[socket.socket]) -> None:
    """A missing directory is made 0750 and the socket 0660, both with the configured group."""
    path = tmp_path / "run" / "signerd" / "signerd.sock"
    sock = bind_unix_socket(str(path), group="nogroup")
    bound.append(sock)
    assert mode_of(path.parent) == 0o750 and os.stat(path.parent).st_gid == NOGROUP
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert mode_of(path) == 0o660 and os.stat(path).st_gid == NOGROUP
    assert [p.name for p in path.parent.iterdir()] == ["signerd.sock"]  # no temporary left
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()


def test_mode_and_numeric_group(tmp_path: Path, bound: list[socket.socket]) -> None:
    """mode and a numeric group are applied as given; an existing directory keeps its mode."""
    (tmp_path / "run").mkdir(mode=0o700)
    path = tmp_path / "run" / "s.sock"
    bound.append(bind_unix_socket(str(path), mode=0o600, group=NOGROUP))
    assert mode_of(path) == 0o600 and os.stat(path).st_gid == NOGROUP
    assert mode_of(tmp_path / "run") == 0o700


def test_group_members_connect_others_do_not(shared_tmp: Path, bound: list[socket.socket]) -> None:
    """With mode 0660 and group users, nobody can connect only while it is in that group."""
    (shared_tmp / "run").mkdir(mode=0o755)
    path = shared_tmp / "run" / "s.sock"
    bound.append(bind_unix_socket(str(path), group="users"))
    member = Client(str(path), user="nobody", group="nogroup", extra_groups=["users"])
    outsider = Client(str(path), user="nobody", group="nogroup")
    try:
        assert member.connect() == "connected"
        assert outsider.connect() == "error 13"  # EACCES
    finally:
        member.finish()
        outsider.finish()


@pytest.mark.parametrize("kind", ["symlink", "other-writable", "file"])
def test_refuses_unsafe_directory(tmp_path: Path, kind: str) -> None:
    """The socket's directory may not be a symlink, writable by others, or not a directory."""
    directory = tmp_path / "run"
    if kind == "symlink":
        (tmp_path / "elsewhere").mkdir()
        directory.symlink_to(tmp_path / "elsewhere")
    elif kind == "other-writable":
        directory.mkdir()
        directory.chmod(0o777)
    else:
        directory.write_text("")
    with pytest.raises(SocketError, match="socket directory"):
        bind_unix_socket(str(directory / "s.sock"))
    assert not (tmp_path / "elsewhere" / "s.sock").exists()


def setfacl(*args: str) -> None:
    """Run setfacl (the ``acl`` package, which ``make system`` installs)."""
    if shutil.which("setfacl") is None:
        pytest.fail("setfacl is needed (apt-get install acl, or make system)")
    subprocess.run(["setfacl", *args], check=True, capture_output=True)


@pytest.mark.parametrize(
    ("entry", "who", "where"),
    [
        ("g:staff:rwx", "group 50", "run"),
        ("u:nobody:rwx", "user 65534", "run"),
        ("g:staff:rwx", "group 50", "."),  # a directory above the socket's
    ],
)
def test_refuses_a_directory_an_acl_lets_others_write(
    tmp_path: Path, entry: str, who: str, where: str
) -> None:
    """A POSIX ACL entry granting write to a user or group refuses the directory, and says so."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o750)
    setfacl("-m", entry, str(tmp_path / where))
    with pytest.raises(SocketError, match=f"writable by {who} \\(a POSIX ACL entry\\)"):
        bind_unix_socket(str(directory / "s.sock"))
    assert not (directory / "s.sock").exists()


def test_an_acl_entry_the_mask_takes_write_from_is_accepted(
    tmp_path: Path, bound: list[socket.socket]
) -> None:
    """An ACL entry with write, under a mask without it (chmod g-w), grants no write: accepted."""
    directory = tmp_path / "run"
    directory.mkdir(mode=0o750)
    setfacl("-m", "g:staff:rwx", str(directory))
    directory.chmod(0o750)  # the mask becomes r-x: staff may read and search, not write
    bound.append(bind_unix_socket(str(directory / "s.sock")))
    assert stat.S_ISSOCK(os.lstat(directory / "s.sock").st_mode)


def test_socket_takes_no_acl_from_the_directory(
    shared_tmp: Path, bound: list[socket.socket]
) -> None:
    """A default ACL naming nobody on the directory does not let nobody connect: the mode decides."""
    directory = shared_tmp / "run"
    directory.mkdir(mode=0o755)
    setfacl("-d", "-m", "u:nobody:rwx", str(directory))
    path = directory / "s.sock"
    bound.append(bind_unix_socket(str(path), group="users"))
    with pytest.raises(OSError) as missing:
        os.getxattr(path, "system.posix_acl_access")
    assert missing.value.errno == errno.ENODATA
    assert mode_of(path) == 0o660
    outsider = Client(str(path), user="nobody", group="nogroup")
    try:
        assert outsider.connect() == "error 13"  # EACCES: not in the group, no ACL entry
    finally:
        outsider.finish()


def test_refuses_symlink_path(tmp_path: Path) -> None:
    """A symlink at the socket path is refused and left as it was (the target is not touched)."""
    target = tmp_path / "target"
    target.write_text("precious")
    path = tmp_path / "s.sock"
    path.symlink_to(target)
    with pytest.raises(SocketError, match="is a symlink"):
        bind_unix_socket(str(path))
    assert path.is_symlink() and target.read_text() == "precious"


def test_refuses_symlink_to_a_stale_socket(tmp_path: Path) -> None:
    """Even a symlink to a stale socket is refused: the path itself must be ours."""
    stale = tmp_path / "real.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    path = tmp_path / "s.sock"
    path.symlink_to(stale)
    with pytest.raises(SocketError, match="is a symlink"):
        bind_unix_socket(str(path))


def test_refuses_regular_file(tmp_path: Path) -> None:
    """A file that is not a socket is refused and kept."""
    path = tmp_path / "s.sock"
    path.write_text("data")
    with pytest.raises(SocketError, match="not a socket"):
        bind_unix_socket(str(path))
    assert path.read_text() == "data"


def test_replaces_stale_socket(tmp_path: Path, bound: list[socket.socket]) -> None:
    """A socket file nobody listens on (a crash left it) is replaced."""
    path = tmp_path / "s.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client,
        pytest.raises(ConnectionRefusedError),
    ):
        client.connect(str(path))
    sock = bind_unix_socket(str(path))
    bound.append(sock)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        conn, _ = sock.accept()
        conn.close()


LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen(8)
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.sendall(b"still here")
        except OSError:
            pass  # signerd's probe connects and leaves at once
        c.close()
    """
)


def test_refuses_socket_another_process_listens_on(tmp_path: Path) -> None:
    """A live socket of another process is refused, and that process keeps serving on it."""
    path = tmp_path / "s.sock"
    other = subprocess.Popen(
        [sys.executable, "-c", LISTENER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == "listening"
        with pytest.raises(SocketError, match="another process is listening"):
            bind_unix_socket(str(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(5)
            client.connect(str(path))
            assert client.recv(100) == b"still here"
    finally:
        other.kill()
        other.wait()
        for stream in (other.stdin, other.stdout):
            if stream is not None:
                stream.close()


def test_refuses_a_live_socket_of_our_own(tmp_path: Path, bound: list[socket.socket]) -> None:
    """A second signerd on the same path does not steal the first one's socket."""
    path = tmp_path / "s.sock"
    first = bind_unix_socket(str(path))
    bound.append(first)
    with pytest.raises(SocketError, match="another process is listening"):
        bind_unix_socket(str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(path))
        conn, _ = first.accept()
        conn.close()


def test_refuses_stale_socket_of_another_user(tmp_path: Path) -> None:
    """A stale socket owned by another uid is not ours to remove."""
    path = tmp_path / "s.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    os.chown(path, 65534, 65534)
    with pytest.raises(SocketError, match="belongs to another user"):
        bind_unix_socket(str(path))
    assert path.exists()


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("\0signerd", "abstract sockets are refused"),
        ("", "abstract sockets are refused"),
        ("/tmp/" + "x" * 120 + "/s.sock", "too long"),
    ],
)
def test_refuses_abstract_and_overlong_paths(path: str, message: str) -> None:
    """Abstract names and paths that do not fit sun_path are refused."""
    with pytest.raises(SocketError, match=message):
        bind_unix_socket(path)


def test_unknown_group_is_refused(tmp_path: Path) -> None:
    """A group name that does not exist is a start-up error, not a silent default."""
    with pytest.raises(SocketError, match="group does not exist"):
        bind_unix_socket(str(tmp_path / "s.sock"), group="no-such-group-xyz")
    assert not (tmp_path / "s.sock").exists()


def test_unlink_own_socket_only_removes_ours(tmp_path: Path) -> None:
    """Shutdown removes the socket file only while it is still the one we bound."""
    path = tmp_path / "s.sock"
    sock = bind_unix_socket(str(path))
    try:
        assert unlink_own_socket(str(path), sock)
        assert not path.exists()
        assert not unlink_own_socket(str(path), sock)  # already gone: fine
        replacement = bind_unix_socket(str(path))  # someone else's now
        try:
            assert not unlink_own_socket(str(path), sock)
            assert path.exists()
        finally:
            replacement.close()
    finally:
        sock.close()
