"""A booted Debian bookworm under systemd-nspawn, for the systemd tests.

- ``ensure_rootfs()``: a minbase bookworm with systemd, python3, softhsm2 and a
  venv ``/opt/signerd`` holding signerd's dependencies (wheels built on the
  host, installed offline). Built once per machine, cached in
  ``/var/cache/signerd-test/rootfs-<sha of package list + requirements>``; a
  lock serialises concurrent builders; a half-built tree is never used.
- ``Container``: an overlay over the cached tree (the cache stays clean), the
  work tree's signerd installed with ``make install DESTDIR=...``, booted with
  ``systemd-nspawn --register=no --keep-unit -b`` and driven from outside with
  ``nsenter -t PID -a``. ``close()`` powers it off (SIGKILL after a deadline),
  unmounts and removes the overlay, whatever happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SIGNERD_TEST_CACHE", "/var/cache/signerd-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "procps",
    "python3",
    "python3-venv",
    "softhsm2",
)
EXTRAS = "pkcs11,vault,systemd"
VENV = "/opt/signerd"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS.split(","):
        reqs += project["optional-dependencies"][extra]
    return sorted(reqs)


def rootfs_key() -> str:
    doc = {"suite": SUITE, "mirror": MIRROR, "packages": PACKAGES, "requirements": _requirements()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _run(args: list[str], *, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, text=True, capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]


def _wheels(into: Path, *, deps: bool) -> None:
    """Wheels of signerd (and, with ``deps``, of its dependencies) built with this Python."""
    args = [sys.executable, "-m", "pip", "wheel", "-q", "-w", str(into)]
    args += [f"{REPO}[{EXTRAS}]"] if deps else ["--no-deps", str(REPO)]
    _run(args, timeout=600)


def _nspawn(root: Path, *cmd: str, timeout: float = 600) -> None:
    """Run one command in ``root`` (not booted)."""
    _run(
        ["systemd-nspawn", "--register=no", "--keep-unit", "-q", "-D", str(root), "--", *cmd],
        timeout=timeout,
        env={**os.environ, "SYSTEMD_NSPAWN_TMPFS_TMP": "0"},
    )


def ensure_rootfs() -> Path:
    """The cached root file system, built now when missing (about a minute and a half)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    root = CACHE / f"rootfs-{rootfs_key()}"
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root
        building = Path(tempfile.mkdtemp(prefix=f"{root.name}.build-", dir=CACHE))
        try:
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(PACKAGES)}",
                    SUITE,
                    str(building),
                    MIRROR,
                ],
                timeout=900,
            )
            wheels = building / "tmp" / "wheels"
            wheels.mkdir(parents=True)
            _wheels(wheels, deps=True)
            _nspawn(building, "python3", "-m", "venv", VENV)
            _nspawn(
                building,
                f"{VENV}/bin/pip",
                "install",
                "-q",
                "--no-index",
                "--find-links",
                "/tmp/wheels",
                *_requirements(),
            )
            shutil.rmtree(wheels)
            (building / "etc" / "hostname").write_text("signerd-test\n")
            (building / ".complete").write_text(rootfs_key() + "\n")
            if root.exists():
                shutil.rmtree(root)
            building.rename(root)
        finally:
            if building.exists():
                _unmount_under(building)
                shutil.rmtree(building, ignore_errors=True)
    return root


def _unmount_under(path: Path) -> None:
    """Unmount whatever a failed debootstrap left mounted below ``path`` (proc, sys)."""
    prefix = str(path) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(prefix)]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


class Container:
    """A booted overlay of the cached rootfs with the work tree's signerd installed."""

    def __init__(self, rootfs: Path) -> None:
        self.lower = rootfs
        self.base = Path(tempfile.mkdtemp(prefix="signerd-boot-", dir="/var/tmp"))
        self.root = self.base / "merged"
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.console = self.base / "console.log"
        for d in ("upper", "work", "merged"):
            (self.base / d).mkdir()
        _run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={rootfs},upperdir={self.base / 'upper'},workdir={self.base / 'work'}",
                str(self.root),
            ],
            timeout=30,
        )

    # --- before boot ---

    def install_signerd(self) -> None:
        """signerd's wheel into the venv, then ``make install DESTDIR=root BINDIR=venv/bin``."""
        wheels = self.root / "tmp" / "signerd-wheel"
        wheels.mkdir(parents=True)
        _wheels(wheels, deps=False)
        wheel = next(wheels.glob("signerd-*.whl")).name
        _nspawn(
            self.root,
            f"{VENV}/bin/pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--force-reinstall",
            f"/tmp/signerd-wheel/{wheel}",
            timeout=120,
        )
        shutil.rmtree(wheels)
        _run(
            [
                "make",
                "-s",
                "-C",
                str(REPO),
                "install",
                f"DESTDIR={self.root}",
                f"BINDIR={VENV}/bin",
            ],
            timeout=60,
        )

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file into the container (before boot or while running)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    # --- boot and drive ---

    def boot(self, timeout: float = 60) -> None:
        with open(self.console, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--register=no",
                    "--keep-unit",
                    "--private-network",
                    "-q",
                    "-D",
                    str(self.root),
                    "-b",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.leader:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not start:\n{self.console_tail()}")
            self.leader = self._find_leader()
            time.sleep(0.1)
        state = ""
        while state not in ("running", "degraded"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"container did not boot: {state}\n{self.console_tail()}")
            left = max(1.0, deadline - time.monotonic())
            done = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=left)
            state = done.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.5)

    def _find_leader(self) -> int:
        """The container's PID 1 (its systemd): a descendant of nspawn that is PID 1 inside."""
        assert self.proc is not None
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
            nspid = fields.get("NSpid", "").split()
            if (
                len(nspid) >= 2
                and nspid[-1] == "1"
                and fields.get("Name", "").strip() == "systemd"
                and self._descends(int(entry.name))
            ):
                return int(entry.name)
        return 0

    def _descends(self, pid: int) -> bool:
        assert self.proc is not None
        for _ in range(8):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return False
            pid = int(stat.rsplit(")", 1)[1].split()[1])
            if pid == self.proc.pid:
                return True
            if pid <= 1:
                return False
        return False

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A command in all of the container's namespaces, as root, with a clean environment."""
        args = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", *cmd]
        done = subprocess.run(
            args, text=True, capture_output=True, timeout=timeout, input=input, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} -> {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
            )
        return done

    def popen(self, *cmd: str) -> subprocess.Popen[str]:
        args = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", *cmd]
        return subprocess.Popen(args, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *args: str) -> str:
        return self.run("journalctl", "--no-pager", "-q", *args, timeout=60).stdout

    def console_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.console.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def close(self) -> None:
        """Power off (SIGKILL after 20 s), unmount, remove everything of this run."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.leader:
                    with contextlib.suppress(Exception):
                        self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
        finally:
            for _ in range(10):
                done = subprocess.run(["umount", str(self.root)], capture_output=True, check=False)
                if done.returncode == 0 or not os.path.ismount(self.root):
                    break
                time.sleep(0.5)
            if not os.path.ismount(self.root):
                shutil.rmtree(self.base, ignore_errors=True)
