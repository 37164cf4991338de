"""The listening Unix socket: private directory, fixed mode and group, no surprises.

``bind_unix_socket`` refuses to start on anything it does not own: a path that
is a symlink, a file that is not a socket, a socket another process listens on,
or a directory that anyone but its owner can write to. Whoever can write to the
socket's directory (or to any directory above it) can rename the socket away
and listen in its place, receiving callers' sign requests; so the directory and
every directory on the way to it must belong to root or to signerd's user and
must not be group- or world-writable, by its mode or by a POSIX ACL entry
(``system.posix_acl_access``: a named user or group, or the owning group,
with write the ACL's mask lets through), unless it is sticky and owned by
root (like ``/tmp``: others cannot rename what they do not own there). A socket file nobody listens on
(left by a crash) is replaced. The socket is bound under a temporary name,
given its mode and group (and stripped of any ACL it inherited from a default
ACL of the directory, so the mode alone says who may connect), and only then
renamed into place, so a client never finds it with looser permissions; the rename also replaces a stale socket in
one step. Abstract sockets (no file, no permissions) are never used.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import struct
import weakref

__all__ = ["SocketError", "bind_unix_socket", "socket_path_errors", "unlink_own_socket"]

_SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH
# POSIX ACLs as Linux stores them in an extended attribute (acl/include/acl_ea.h):
# a version word, then (tag, permissions, id) entries
_ACL_ACCESS = "system.posix_acl_access"
_ACL_VERSION = struct.Struct("<I")
_ACL_ENTRY = struct.Struct("<HHI")
_ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK = 0x02, 0x04, 0x08, 0x10
_ACL_WRITE = 0x02
_NO_ACL = {errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP}

# device and inode of the file each listening socket was bound to
_BOUND: weakref.WeakKeyDictionary[socket.socket, tuple[int, int]] = weakref.WeakKeyDictionary()


class SocketError(ValueError):
    """The socket path cannot be used safely; signerd does not start."""


def bind_unix_socket(
    path: str,
    *,
    mode: int = 0o660,
    group: str | int | None = None,
    dir_mode: int = 0o750,
) -> socket.socket:
    """Bind, set mode and group, and listen on a Unix socket at ``path``."""
    if not path or path.startswith("\0") or "\0" in path:
        raise SocketError("socket path must be a file system path (abstract sockets are refused)")
    gid = _group_id(group)
    if dir_mode & _SHARED_WRITE:
        raise SocketError(
            f"socket directory mode must not be group- or world-writable: {dir_mode:o}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    temp = os.path.join(directory, f".{os.getpid()}.sock.tmp")
    if max(len(os.fsencode(path)), len(os.fsencode(temp))) > _SUN_PATH_MAX:
        raise SocketError(f"socket path is too long for a Unix socket: {path}")
    _ensure_directory(directory, dir_mode, gid)
    _check_existing(path)

    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(temp)
        _drop_acl(temp)  # inherited from a default ACL: it could let others connect
        os.chmod(temp, mode)
        if gid is not None:
            os.chown(temp, -1, gid)
        sock.listen(socket.SOMAXCONN)
        _check_existing(path)  # again, right before replacing it
        os.rename(temp, path)
        st = os.lstat(path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _BOUND[sock] = (st.st_dev, st.st_ino)
    return sock


def unlink_own_socket(path: str, sock: socket.socket) -> bool:
    """Remove ``path`` if it is still the file ``sock`` was bound to; say whether it was."""
    ident = _BOUND.get(sock)
    if ident is None:
        return False
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != ident:
        return False
    os.unlink(path)
    return True


def _group_id(group: str | int | None) -> int | None:
    if group is None:
        return None
    if isinstance(group, bool) or (isinstance(group, int) and group < 0):
        raise SocketError(f"invalid socket group: {group!r}")
    if isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise SocketError(f"socket group does not exist: {group!r}") from None


def _ensure_directory(directory: str, dir_mode: int, gid: int | None) -> None:
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        os.mkdir(directory, 0o700)
        if gid is not None:
            os.chown(directory, -1, gid)
        os.chmod(directory, dir_mode)
        st = os.lstat(directory)
    if stat.S_ISLNK(st.st_mode):
        raise SocketError(f"socket directory is a symlink: {directory}")
    if not stat.S_ISDIR(st.st_mode):
        raise SocketError(f"socket directory is not a directory: {directory}")
    _check_private(directory, st)
    # every directory above it, as written and as resolved: renaming any of them swaps the socket
    for path in (directory, os.path.realpath(directory)):
        parent = os.path.dirname(path)
        while True:
            try:
                st = os.stat(parent)
            except OSError as exc:
                raise SocketError(f"cannot check directory {parent}: {exc.strerror}") from exc
            _check_private(parent, st, "directory above the socket")
            if parent == os.path.dirname(parent):
                break
            parent = os.path.dirname(parent)


def _check_private(
    directory: str, st: os.stat_result, what: str = "socket directory", owner: int | None = None
) -> None:
    """Refuse a directory that someone other than root or us (or ``owner``) could rename
    entries in."""
    me = os.geteuid() if owner is None else owner
    if st.st_uid not in (0, me):
        raise SocketError(f"{what} belongs to another user (uid {st.st_uid}): {directory}")
    if st.st_mode & stat.S_ISVTX and st.st_uid == 0:
        return  # sticky, like /tmp: others may add entries, not rename ours
    writers = _acl_writers(directory, owner)
    if writers:
        who = ", ".join(writers)
        raise SocketError(f"{what} is writable by {who} (a POSIX ACL entry): {directory}")
    if st.st_mode & _SHARED_WRITE:
        who = "other users" if st.st_mode & stat.S_IWOTH else "its group"
        raise SocketError(f"{what} is writable by {who}: {directory}")


def _acl_writers(path: str, owner: int | None = None) -> list[str]:
    """Who, besides root and us, the access ACL of ``path`` lets write: ``user UID``,
    ``group GID``, ``its group``; empty without an ACL (or where ACLs are not supported)."""
    try:
        raw = os.getxattr(path, _ACL_ACCESS)
    except OSError as exc:
        if exc.errno in _NO_ACL:
            return []
        raise SocketError(f"cannot read the ACL of {path}: {exc.strerror}") from exc
    count, extra = divmod(len(raw) - _ACL_VERSION.size, _ACL_ENTRY.size)
    if count < 0 or extra or _ACL_VERSION.unpack_from(raw)[0] != 2:
        raise SocketError(f"cannot read the ACL of {path}: unknown format")
    entries = [
        _ACL_ENTRY.unpack_from(raw, _ACL_VERSION.size + i * _ACL_ENTRY.size) for i in range(count)
    ]
    mask = next((perm for tag, perm, _ in entries if tag == _ACL_MASK), 0o7)
    writers = []
    for tag, perm, ident in entries:
        if not perm & mask & _ACL_WRITE:
            continue
        if tag == _ACL_USER and ident not in (0, os.geteuid() if owner is None else owner):
            writers.append(f"user {ident}")
        elif tag == _ACL_GROUP:
            writers.append(f"group {ident}")
        elif tag == _ACL_GROUP_OBJ:
            writers.append("its group")
    return writers


def socket_path_errors(path: str, group: str | None, owner: int) -> list[str]:
    """What ``bind_unix_socket`` would refuse about ``path`` for a daemon running as
    ``owner``, read only: the path, the group, the socket directory and every directory
    above it (the nearest existing one when it is still to be made). A socket already
    there (systemd's, when activated) is not probed."""
    errors: list[str] = []
    checks: list[tuple[str, str]] = []
    if not path or path.startswith("\0") or "\0" in path:
        return ["socket path must be a file system path (abstract sockets are refused)"]
    path = os.path.abspath(path)
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        errors.append(f"socket path is too long for a Unix socket: {path}")
    try:
        _group_id(group)
    except SocketError as exc:
        errors.append(str(exc))
    directory = os.path.dirname(path)
    try:
        st = os.lstat(path)
    except OSError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode):
            errors.append(f"socket path is a symlink: {path}")
        elif not stat.S_ISSOCK(st.st_mode):
            errors.append(f"socket path exists and is not a socket: {path}")
    what = "socket directory"
    while not os.path.lexists(directory) and directory != os.path.dirname(directory):
        directory, what = os.path.dirname(directory), "directory above the socket"
    checks.append((directory, what))
    for start in (directory, os.path.realpath(directory)):
        parent = os.path.dirname(start)
        while parent != start:
            checks.append((parent, "directory above the socket"))
            start, parent = parent, os.path.dirname(parent)
    seen: set[str] = set()
    for place, what in checks:
        if place in seen:
            continue
        seen.add(place)
        try:
            st = os.lstat(place) if what == "socket directory" else os.stat(place)
            if stat.S_ISLNK(st.st_mode):
                raise SocketError(f"socket directory is a symlink: {place}")
            if not stat.S_ISDIR(st.st_mode):
                raise SocketError(f"{what} is not a directory: {place}")
            _check_private(place, st, what, owner)
        except SocketError as exc:
            errors.append(str(exc))
        except OSError as exc:
            errors.append(f"cannot check directory {place}: {exc.strerror}")
    return errors


def _drop_acl(path: str) -> None:
    """Remove the access ACL of ``path`` (the mode set next is then all there is)."""
    try:
        os.removexattr(path, _ACL_ACCESS)
    except OSError as exc:
        if exc.errno not in _NO_ACL:
            raise SocketError(f"cannot remove the ACL of {path}: {exc.strerror}") from exc


def _check_existing(path: str) -> None:
    """Return if ``path`` is free or a stale socket of ours (then remove it); else refuse."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise SocketError(f"socket path is a symlink: {path}")
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketError(f"socket path exists and is not a socket: {path}")
    if st.st_uid != os.geteuid():
        raise SocketError(f"socket path belongs to another user (uid {st.st_uid}): {path}")
    if _listening(path):
        raise SocketError(f"another process is listening on {path}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _listening(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except BlockingIOError:
        return True  # EAGAIN: the backlog is full, so someone listens
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            return False
        raise SocketError(f"cannot probe existing socket {path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True
