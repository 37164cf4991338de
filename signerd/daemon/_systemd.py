"""signerd under systemd: readiness, watchdog, the activated socket, credentials, the journal.

Everything here is inert without systemd: ``notify`` does nothing when
``$NOTIFY_SOCKET`` is unset, ``activated_socket`` returns None when
``$LISTEN_FDS`` is unset (signerd then binds its own socket), and logging
stays plain lines on stderr unless stderr is the journal (``$JOURNAL_STREAM``).

- ``notify(...)``: sd_notify(3) lines (``READY=1``, ``RELOADING=1``,
  ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``), one datagram, no dependency.
- ``Watchdog``: a task on the event loop that sends ``WATCHDOG=1`` every half
  ``$WATCHDOG_USEC``. Because the ping runs on the loop itself, a loop that is
  blocked stops pinging and systemd kills and restarts the service.
- ``activated_socket``: the socket systemd passed (``systemd.daemon``
  ``listen_fds_with_names``), checked against the same rules signerd applies
  to a socket it binds (path, no access for others, group).
- ``SystemdSession``: what one signerd (a single process or the supervisor)
  tells systemd: ``STATUS=``, ``READY=1``, ``RELOADING=1`` around a reload,
  ``STOPPING=1``, and the watchdog interval.

Logging to the journal is in ``_journal``.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable

from ._sockets import SocketError

__all__ = [
    "ActivationError",
    "SystemdSession",
    "Watchdog",
    "activated_socket",
    "monotonic_usec",
    "notify",
    "watchdog_interval",
]

log = logging.getLogger("signerd")

# systemd's own rule for credential names, narrowed to what a file name can safely be
_FD_NAMES = ("signerd", "signerd.socket")


class ActivationError(SocketError):
    """The socket systemd passed does not fit the configuration (a configuration error: 78)."""


# --- sd_notify -------------------------------------------------------------


def notify(*lines: str) -> bool:
    """Send sd_notify lines to ``$NOTIFY_SOCKET``; False when there is none or it failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    message = "\n".join(line.replace("\n", " ") for line in lines).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.connect(path)
            s.sendall(message)
        except OSError as exc:
            log.warning("signerd.notify_failed error=%s", exc.strerror)
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between pings (half ``$WATCHDOG_USEC``), or None when no watchdog is asked for."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not re.fullmatch(r"[1-9][0-9]{0,15}", usec):
        return None
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us differently)
    return int(usec) / 2e6


class Watchdog:
    """``WATCHDOG=1`` from the event loop itself, so a stalled loop stops the pings."""

    def __init__(self, interval: float | None) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.interval is None or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._run(self.interval))
        log.info("signerd.watchdog interval=%.3f", self.interval)

    async def _run(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def monotonic_usec() -> str:
    """MONOTONIC_USEC= for RELOADING=1 (systemd 253+ matches it to the reload; older ignore it)."""
    return f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


class SystemdSession:
    """What one signerd process tells systemd about the service, in either mode.

    ``serving`` gives what follows ``STATUS=serving`` (the key count, the
    workers); the outcome of the last reload stays appended until the next one.
    ``watchdog`` is the ping interval systemd asked for (None: no watchdog);
    ``tick`` pings at that pace from a loop that calls it often.
    """

    def __init__(self, serving: Callable[[], str]) -> None:
        self._serving = serving
        self.note = ""  # the last reload's outcome, kept in STATUS= until the next one
        self.watchdog = watchdog_interval()
        self._pinged = 0.0

    def status(self) -> str:
        return f"STATUS=serving {self._serving()}{self.note}"

    def starting(self, what: str) -> None:
        notify(f"STATUS=starting: {what}")

    def ready(self) -> None:
        notify("READY=1", self.status())

    def update(self) -> None:
        """The STATUS= line again (the key count changed)."""
        notify(self.status())

    def reloading(self) -> None:
        notify("RELOADING=1", "STATUS=reloading the policy", monotonic_usec())

    def reloaded(self, applied: bool) -> None:
        """The reload is over: READY=1 again, STATUS= saying whether it was applied."""
        self.note = " (reloaded)" if applied else " (reload refused, see the log)"
        self.ready()

    def stopping(self, what: str) -> None:
        notify("STOPPING=1", f"STATUS=stopping: {what}")

    def tick(self) -> None:
        """WATCHDOG=1 when the interval has passed since the last ping."""
        if self.watchdog is None:
            return
        now = time.monotonic()
        if now - self._pinged >= self.watchdog:
            self._pinged = now
            notify("WATCHDOG=1")


# --- socket activation -----------------------------------------------------


def _listen_fds() -> dict[int, str]:
    if not os.environ.get("LISTEN_FDS"):
        return {}
    try:
        daemon = importlib.import_module("systemd.daemon")
    except ImportError:
        raise ActivationError(
            "systemd passed a socket ($LISTEN_FDS) but systemd-python is not installed"
            " (the 'systemd' extra of the signerd wheel)"
        ) from None
    fds: dict[int, str] = daemon.listen_fds_with_names(True)
    return fds


def activated_socket(path: str, *, mode: int, group: str | None) -> socket.socket | None:
    """The listening socket systemd passed for ``path``, or None when none was passed.

    With several sockets the one named ``signerd`` (``FileDescriptorName=``) or
    ``signerd.socket`` is taken; the others are closed. The socket must be a
    listening Unix stream socket bound to ``path`` whose file grants nothing to
    others and, when ``server.socket_group`` is set, belongs to that group.
    """
    fds = _listen_fds()
    if not fds:
        return None
    chosen = next(iter(fds)) if len(fds) == 1 else None
    for fd, name in fds.items():
        if chosen is None and name in _FD_NAMES:
            chosen = fd
    for fd in fds:
        if fd != chosen:
            os.close(fd)
    if chosen is None:
        raise ActivationError(f"none of the passed sockets is named {' or '.join(_FD_NAMES)}")
    sock = socket.socket(fileno=chosen)
    try:
        _check_activated(sock, path, mode, group)
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(False)
    log.info("signerd.socket_activated socket=%s", path)
    return sock


def _check_activated(sock: socket.socket, path: str, mode: int, group: str | None) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError("the passed socket is not a Unix stream socket (ListenStream=PATH)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ActivationError("the passed socket is not listening")
    bound = sock.getsockname()
    if not isinstance(bound, str) or bound != path:
        raise ActivationError(
            f"the passed socket is bound to {bound!r}, the configuration says {path}"
            " (server.socket must equal ListenStream=)"
        )
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode) or st.st_mode & 0o007:
        raise ActivationError(f"socket {path} grants access to others (SocketMode= must end in 0)")
    if os.lstat(os.path.dirname(path)).st_mode & stat.S_IWOTH:
        raise ActivationError(
            f"socket directory is writable by other users: {os.path.dirname(path)}"
        )
    if st.st_mode & 0o777 != mode:
        log.warning(
            "signerd.socket_mode_differs socket=%s mode=%04o configured=%04o",
            path,
            st.st_mode & 0o777,
            mode,
        )
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ActivationError(f"socket group does not exist: {group!r}") from None
        if st.st_gid != gid:
            raise ActivationError(f"socket {path} is not in group {group} (SocketGroup=)")


# --- credentials -----------------------------------------------------------
