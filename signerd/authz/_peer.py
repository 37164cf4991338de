"""Who is on the other end of a Unix socket, as the kernel reports it.

``peer_of`` never reads anything the caller sends. pid, uid and gid come from
``SO_PEERCRED`` and the supplementary groups from ``SO_PEERGROUPS``, both
recorded by the kernel when the caller connected. The systemd unit comes from
``/proc/PID/cgroup``, which is only safe to read if PID still names the process
that connected: a caller could connect, exit, and let another process take its
pid. So the unit is read through a pidfd for the connecting process
(``SO_PEERPIDFD``, Linux 6.5+), and after reading ``/proc`` we check that this
process has not exited; while it has not, its pid cannot have been reused.
If that cannot be established the unit is ``None``, and rules that name a
unit do not match.

On kernels without ``SO_PEERPIDFD`` the fallback is ``os.pidfd_open(pid)``,
which leaves a small window between connect and the lookup; it is narrowed by
also requiring ``/proc/PID/status`` to show the uid the kernel reported.
"""

from __future__ import annotations

import errno
import os
import pwd
import re
import select
import socket
import struct

from ._calls import Peer

__all__ = ["kernel_groups", "peer_of", "unit_from_cgroup"]

SO_PEERPIDFD = 77  # Linux >= 6.5; not in the socket module before Python 3.14
SO_PEERGROUPS = 59  # Linux >= 4.13
_UCRED = struct.Struct("3i")
_MAX_GROUPS_BYTES = 1024  # the socket module's getsockopt limit: 256 groups

# systemd unit names that can hold processes; the character set of unit_name_is_valid()
_UNIT_RE = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}\.(service|scope)")


def peer_of(sock: socket.socket) -> Peer:
    """The kernel's view of the process that connected ``sock``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    groups = kernel_groups(sock)
    unit: str | None = None
    if pid > 0:
        pidfd = _peer_pidfd(sock, pid)
        if pidfd is not None:
            try:
                unit, proc_groups = _read_proc(pid, uid, pidfd_from_kernel=pidfd[1])
                if not _still_running(pidfd[0]):
                    unit, proc_groups = None, None
            finally:
                os.close(pidfd[0])
            if groups is None and proc_groups is not None:
                groups = proc_groups
    return Peer(
        pid=pid,
        uid=uid,
        gid=gid,
        unit=unit,
        user=_user_name(uid),
        groups=groups if groups is not None else (),
    )


def unit_from_cgroup(text: str) -> str | None:
    """The system unit named by the contents of ``/proc/PID/cgroup``.

    Uses the unified hierarchy (``0::``) when the process is placed in it, else
    the legacy ``name=systemd`` one. Like systemd's ``cg_path_get_unit``, the unit
    is the first path component after the leading slices, so a sub-cgroup that
    a delegated service creates (or a user's own ``gateway.service`` under
    ``user@1000.service``) still reports the unit that contains it.
    """
    unified: str | None = None
    legacy: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, where = parts
        if hierarchy == "0" and controllers == "":
            unified = where
        elif "name=systemd" in controllers.split(","):
            legacy = where
    path = unified if unified is not None and unified != "/" else legacy
    if path is None:
        return None
    for component in path.strip("/").split("/"):
        if component.endswith(".slice"):
            continue
        return component if _UNIT_RE.fullmatch(component) else None
    return None


def kernel_groups(sock: socket.socket) -> tuple[int, ...] | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _MAX_GROUPS_BYTES)
    except OSError:  # ERANGE (over 256 groups) or an old kernel
        return None
    count = len(raw) // 4
    return tuple(sorted(set(struct.unpack(f"{count}I", raw[: count * 4]))))


def _peer_pidfd(sock: socket.socket, pid: int) -> tuple[int, bool] | None:
    """A pidfd for the peer, and whether the kernel bound it to the connection."""
    try:
        fd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            return None  # ESRCH: the peer is gone; its pid may already be reused
    else:
        if _pidfd_pid(fd) != pid:
            os.close(fd)
            return None
        return fd, True
    try:
        return os.pidfd_open(pid), False
    except OSError:
        return None


def _pidfd_pid(fd: int) -> int | None:
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_proc(
    pid: int, uid: int, *, pidfd_from_kernel: bool
) -> tuple[str | None, tuple[int, ...] | None]:
    """Unit and supplementary groups from /proc/PID, or (None, None)."""
    try:
        dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None, None
    try:
        status = _read_at(dirfd, "status")
        cgroup = _read_at(dirfd, "cgroup")
    except OSError:
        return None, None
    finally:
        os.close(dirfd)
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    try:
        uids = [int(v) for v in fields.get("Uid", "").split()]
        groups = tuple(sorted({int(v) for v in fields.get("Groups", "").split()}))
    except ValueError:
        return None, None
    if not pidfd_from_kernel and (len(uids) < 2 or uids[1] != uid):
        return None, None  # pidfd_open fallback: not the process that connected
    return unit_from_cgroup(cgroup), groups


def _read_at(dirfd: int, name: str) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(fd)


def _still_running(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return not poller.poll(0)


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None
