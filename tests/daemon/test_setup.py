"""Set-up and secrets: no PIN on a command line, no socket directory a group can write to.

Issue 8, "Set-up and secrets": make-token.sh passed the token PINs in argv
(readable by every local user in /proc); `signerctl sign --data-b64` puts the
data in argv; and a member of the socket's group could rename the socket out of
a group-writable directory and listen in its place.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from signerd.cli import build_parser
from signerd.daemon._sockets import SocketError, bind_unix_socket

from ..conftest import CHILD_PYTHON, NOBODY, NOGROUP, ROOT, SOFTHSM_MODULE, USERS_GID

pytestmark = pytest.mark.timeout(120)

MAKE_TOKEN = ROOT / "softhsm" / "make-token.sh"


class CmdlineSampler:
    """Reads every process's /proc/PID/cmdline in a loop, as any local user can."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.sweeps = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isascii() or not pid.isdigit() or pid == me:
                    continue
                with contextlib.suppress(OSError):
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        line = fh.read()
                    if line:
                        self.seen.add(line)
            self.sweeps += 1

    def __enter__(self) -> CmdlineSampler:
        self._thread.start()
        while self.sweeps < 2:
            time.sleep(0.001)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _run_make_token(directory: Path, label: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MAKE_TOKEN), str(directory), label],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
    )


def test_make_token_never_puts_a_pin_on_a_command_line(tmp_path: Path) -> None:
    """While make-token.sh initialises a token, no process's argv holds the PIN or a --pin flag."""
    strace = shutil.which("strace")
    assert strace, "strace is needed (make system installs it)"
    directory = tmp_path / "softhsm"
    directory.mkdir()
    pin = "c0ffee" + os.urandom(8).hex()
    (directory / "pin").write_text(pin)
    trace = tmp_path / "execve.trace"
    probe = [str(MAKE_TOKEN), str(directory), "pin-probe"]
    with CmdlineSampler() as sampler:
        out = subprocess.run(
            [strace, "-f", "-qq", "-e", "trace=execve", "-s", "65536", "-o", str(trace), *probe],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"SOFTHSM2_CONF={directory}/softhsm2.conf"
    # every program the script ran, with its full argv (strace -f sees them all)
    execs = [line for line in trace.read_text().splitlines() if "execve(" in line]
    assert any('"softhsm2-util", "--show-slots"' in line for line in execs), execs
    assert any('"-", "' + str(directory / "pin") + '"' in line for line in execs), execs
    for line in execs:
        assert pin not in line, line
        assert "--pin" not in line and "--so-pin" not in line, line
    # and what any local user could read from /proc meanwhile
    assert sampler.sweeps > 2
    for argv in sampler.seen:
        assert pin.encode() not in argv, argv
        assert b"--pin" not in argv and b"--so-pin" not in argv, argv
    assert (directory / "pin").read_text() == pin  # kept, not replaced
    assert (
        "Initialized:      yes"
        in subprocess.run(
            ["softhsm2-util", "--show-slots"],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "SOFTHSM2_CONF": str(directory / "softhsm2.conf")},
        ).stdout
    )


USE_TOKEN = textwrap.dedent(
    """
    import sys, pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    module, label, pin = sys.argv[1:4]
    token = pkcs11.lib(module).get_token(token_label=label)
    with token.open(rw=True, user_pin=pin) as s:
        pub, priv = s.generate_keypair(
            KeyType.EC_EDWARDS, 0, store=True, label="probe",
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            public_template={Attribute.EC_PARAMS: bytes.fromhex("06032b6570")},
        )
        print(len(priv.sign(b"x", mechanism=Mechanism.EDDSA)))
    try:
        token.open(user_pin=pin + "x")
    except pkcs11.PinIncorrect:
        print("wrong pin refused")
    """
)


def test_token_made_without_argv_pins_works_with_the_pin_file(tmp_path: Path) -> None:
    """The token opens with DIR/pin (and not with another PIN), signs, and a re-run keeps it."""
    directory = tmp_path / "softhsm"
    conf = _run_make_token(directory, "usable").stdout.strip().split("=", 1)[1]
    pin = (directory / "pin").read_text()
    assert re.fullmatch(r"[0-9a-f]{16}", pin)
    assert stat.S_IMODE((directory / "pin").stat().st_mode) == 0o600
    env = {**os.environ, "SOFTHSM2_CONF": conf}
    used = subprocess.run(
        [sys.executable, "-c", USE_TOKEN, SOFTHSM_MODULE, "usable", pin],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert used.returncode == 0, used.stderr
    assert used.stdout.split("\n")[:2] == ["64", "wrong pin refused"]
    again = _run_make_token(directory, "usable")  # idempotent: same token, same PIN
    assert again.stdout.strip() == f"SOFTHSM2_CONF={conf}"
    assert (directory / "pin").read_text() == pin
    slots = subprocess.run(
        ["softhsm2-util", "--show-slots"], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    assert len(re.findall(r"Label:\s*usable\s*$", slots, re.MULTILINE)) == 1


# --- signerctl --data-b64 ---


def test_sign_help_says_argv_is_visible(capsys: pytest.CaptureFixture[str]) -> None:
    """`signerctl sign --help` warns that --data-b64 is visible to local users and points to stdin."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sign", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--data-b64" in text
    assert "visible to every local user" in text and "stdin" in text


def test_readme_signs_from_stdin() -> None:
    """README and docs/ examples of `signerctl sign` pass the data on stdin or in a file, never
    on the command line (--data-b64 would show it to every local user in ps)."""
    texts = [(ROOT / "README.md").read_text()]
    texts += [p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))]
    lines = [line for text in texts for line in text.splitlines()]
    uses = [line for line in lines if re.search(r"signerctl (--json )?sign \S", line)]
    assert uses, "README shows signerctl sign"
    for line in uses:
        assert "--data-b64" not in line, line
        assert "|" in line or " < " in line or "--data-file" in line, line


# --- the socket directory ---


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.mark.parametrize(
    ("mode", "owner", "refused"),
    [
        (0o770, 0, "is writable by its group"),
        (0o730, 0, "is writable by its group"),
        (0o2770, 0, "is writable by its group"),
        (0o777, 0, "is writable by other users"),
        (0o1770, NOBODY, "belongs to another user"),
        (0o755, NOBODY, "belongs to another user"),
        (0o1777, NOBODY, "belongs to another user"),
    ],
)
def test_refuses_a_socket_directory_others_can_write(
    shared_tmp: Path, mode: int, owner: int, refused: str
) -> None:
    """A group- or world-writable socket directory, or one another user owns, is refused."""
    directory = shared_tmp / "run"
    directory.mkdir()
    os.chown(directory, owner, USERS_GID)
    directory.chmod(mode)
    with pytest.raises(SocketError, match=f"socket directory {refused}"):
        bind_unix_socket(str(directory / "s.sock"), group="users")
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize("mode", [0o1777, 0o1770, 0o750, 0o700])
def test_accepts_private_or_sticky_root_directories(shared_tmp: Path, mode: int) -> None:
    """0750/0700 directories, and sticky ones owned by root (like /tmp), are accepted."""
    directory = shared_tmp / "run"
    directory.mkdir()
    directory.chmod(mode)
    sock = bind_unix_socket(str(directory / "s.sock"))
    sock.close()
    assert _mode(directory) == mode


def test_refuses_a_writable_directory_above_the_socket(shared_tmp: Path) -> None:
    """A group-writable directory above the socket's (it could rename the whole run/) is refused."""
    parent = shared_tmp / "srv"
    (parent / "run").mkdir(parents=True)
    (parent / "run").chmod(0o750)
    parent.chmod(0o775)
    with pytest.raises(SocketError, match="directory above the socket is writable by its group"):
        bind_unix_socket(str(parent / "run" / "s.sock"))
    os.chown(parent, NOBODY, NOGROUP)
    parent.chmod(0o755)
    with pytest.raises(SocketError, match="directory above the socket belongs to another user"):
        bind_unix_socket(str(parent / "run" / "s.sock"))


def test_refuses_a_shared_dir_mode_for_a_new_directory(tmp_path: Path) -> None:
    """Asking for a group-writable mode for the directory signerd creates is refused."""
    with pytest.raises(SocketError, match="must not be group- or world-writable"):
        bind_unix_socket(str(tmp_path / "run" / "s.sock"), dir_mode=0o770)
    assert not (tmp_path / "run").exists()


RENAMER = textwrap.dedent(
    """
    import os, socket, sys
    path = sys.argv[1]
    try:
        os.rename(path, path + ".away")
    except OSError as exc:
        print(f"rename error {exc.errno}", flush=True)
        sys.exit(0)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(1)
    print("hijacked", flush=True)
    s.settimeout(10)
    c, _ = s.accept()
    print("got " + c.recv(100).decode(), flush=True)
    """
)


def _group_member(path: Path) -> str:
    """Run RENAMER as nobody in group users; return what it printed."""
    proc = subprocess.run(
        [CHILD_PYTHON, "-c", RENAMER, str(path)],
        user=NOBODY,
        group=NOGROUP,
        extra_groups=[USERS_GID],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip() or proc.stderr.strip()


def test_group_member_can_hijack_a_socket_in_a_group_writable_directory(shared_tmp: Path) -> None:
    """The attack is real: in a 0770 directory a group member renames a socket and takes its place."""
    directory = shared_tmp / "run"
    directory.mkdir()
    os.chown(directory, 0, USERS_GID)
    directory.chmod(0o770)
    path = directory / "s.sock"
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # bound the old, unchecked way
    victim.bind(str(path))
    victim.listen(1)
    os.chown(path, 0, USERS_GID)
    path.chmod(0o660)
    try:
        proc = subprocess.Popen(
            [CHILD_PYTHON, "-c", RENAMER, str(path)],
            user=NOBODY,
            group=NOGROUP,
            extra_groups=[USERS_GID],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "hijacked"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as caller:
            caller.settimeout(10)
            caller.connect(str(path))
            caller.sendall(b"sign me")
        assert proc.stdout.readline().strip() == "got sign me"
        proc.wait(timeout=10)
        proc.stdout.close()
    finally:
        victim.close()
    # and signerd refuses to bind there at all
    with pytest.raises(SocketError, match="writable by its group"):
        bind_unix_socket(str(directory / "signerd.sock"), group="users")


def test_group_member_cannot_rename_the_socket_in_a_0750_directory(shared_tmp: Path) -> None:
    """With the socket in a 0750 directory, a member of its group cannot rename it; it still answers."""
    path = shared_tmp / "run" / "signerd.sock"
    sock = bind_unix_socket(str(path), group="users")
    try:
        assert _mode(path.parent) == 0o750 and os.stat(path.parent).st_gid == USERS_GID
        assert _group_member(path) == "rename error 13"  # EACCES
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            conn, _ = sock.accept()
            conn.close()
    finally:
        sock.close()


def test_make_dev_token_makes_var_run_0750(tmp_path: Path) -> None:
    """`make dev-token` (what `make run` starts with) creates var/run 0750, and signerd binds there."""
    var = tmp_path / "var"
    (var / "run").mkdir(parents=True)
    (var / "run").chmod(0o775)  # a loose directory from before is tightened
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    out = subprocess.run(
        ["make", "-C", str(ROOT), "-o", "deps-run", f"VAR={var}", "dev-token"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert _mode(var / "run") == 0o750
    assert (var / "signerd.toml").exists() and (var / "softhsm" / "pin").exists()
    sock = bind_unix_socket(str(var / "run" / "signerd.sock"))
    sock.close()
