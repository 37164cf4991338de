"""Which connections are strangers': callers no rule names.

The listener keeps a share of its connections (and of its accept work) for
callers a policy rule names, by uid or user, group or gid, or systemd unit.
Everyone else is a stranger: a small connection cap per uid, a small share of
the total, and a cheap refusal past them. A rule of ``users = ["*"]`` alone
names no one, so callers only it matches are strangers here (they keep what
it grants, within a stranger's caps).

Deciding costs as little as the policy allows, at accept time: uid and gid
(``SO_PEERCRED``, already read) decide most callers, and that answer is
remembered per (uid, gid) until the policy changes; supplementary groups
(``SO_PEERGROUPS``, one more ``getsockopt``) are read only when a rule naming
a group could still match; the unit (the whole peer lookup, through a pidfd)
only when a rule naming a unit could, and the peer found then is kept for the
connection's requests.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

from ..authz import Peer, names_caller
from ..authz import kernel_groups as _kernel_groups

__all__ = ["Strangers"]

_MAX_REMEMBERED = 4096  # (uid, gid) answers kept; cleared when full


class Strangers:
    """``classify(sock, uid, gid) -> (stranger, peer or None)`` for the current policy."""

    def __init__(self, gate: Callable[[], object], lookup: Callable[[socket.socket], Peer]) -> None:
        self._gate = gate
        self._lookup = lookup
        self._of: object = None  # the gate the remembered answers are about
        self._known: dict[tuple[int, int], bool | None] = {}

    def classify(self, sock: socket.socket, uid: int, gid: int) -> tuple[bool, Peer | None]:
        gate = self._gate()
        if gate is not self._of:
            self._of, self._known = gate, {}
        key = (uid, gid)
        try:
            named = self._known[key]
        except KeyError:
            if len(self._known) >= _MAX_REMEMBERED:
                self._known.clear()
            peer = Peer(pid=0, uid=uid, gid=gid)
            named = self._known[key] = names_caller(gate, peer, groups=False, unit=False)
        if named is not None:
            return not named, None
        groups = _kernel_groups(sock)
        if groups is not None:
            peer = Peer(pid=0, uid=uid, gid=gid, groups=groups)
            named = names_caller(gate, peer, groups=True, unit=False)
            if named is not None:
                return not named, None
        try:
            full = self._lookup(sock)
        except OSError:
            return True, None
        return not names_caller(gate, full, groups=True, unit=True), full
