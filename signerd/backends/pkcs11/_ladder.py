"""How a token session climbs back from a fault, one rung at a time.

The rungs, cheapest first: open a new session and log in again
(``reopen_session``); also forget the cached object handles and find them
again (``refind_handles``); re-initialise the whole library and start from
nothing (``reinitialize``). Between rungs the caller waits a short, jittered,
doubling pause. Each rung is logged once per outage, and the recovery once.

The last rung is the end of the process: when the library comes back up, finds
the token and logs in, and calls still fail with a token error
``exit_after`` times in a row, this process's copy of the library is not to
be trusted; it exits with ``EXIT_TOKEN_WEDGED`` (after the current call is
answered 503) for the supervisor to start a fresh worker. A token that is
simply absent (its directory moved away, a device unplugged) never ends the
process: it is answered 503 until it returns.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable

log = logging.getLogger("signerd.pkcs11")

__all__ = ["EXIT_TOKEN_WEDGED", "STEPS", "Ladder", "TokenVanished"]

REOPEN = "reopen_session"
REFIND = "refind_handles"
REINIT = "reinitialize"
STEPS = (REOPEN, REFIND, REINIT)
EXIT_TOKEN_WEDGED = os.EX_TEMPFAIL  # 75, as a stalled worker: start another


class TokenVanished(Exception):
    """The token answered, but without what it holds: a search that came back empty or
    short, a version whose private key cannot be found while its key says it exists.
    SoftHSM does this, without an error, when it cannot open its files: a fault to climb
    out of, never proof that a key is gone."""


def _exit_soon(code: int) -> None:
    """End the process shortly, once the call in hand has been answered."""
    timer = threading.Timer(0.5, os._exit, (code,))
    timer.daemon = True
    timer.start()


class Ladder:
    """The recovery state of one token session (used under its module lock)."""

    def __init__(
        self,
        *,
        base: float = 0.02,
        cap: float = 0.4,
        exit_after: int = 3,
        sleep: Callable[[float], object] = time.sleep,
        rand: Callable[[], float] = random.random,
        exit: Callable[[int], object] = _exit_soon,
    ) -> None:
        self._base = base
        self._cap = cap
        self._exit_after = exit_after
        self._sleep = sleep
        self._rand = rand
        self._exit = exit
        self._logged: list[str] = []  # rungs taken in this outage, each logged once
        self._wedged = 0  # full climbs in a row that failed with the token reachable
        self.exiting = False

    def first(self, handle_error: bool) -> int:
        """The rung to start on: a stale object handle skips straight to finding them again."""
        return 1 if handle_error else 0

    def take(self, index: int, error: str) -> str:
        """Wait before rung ``index`` (none before the first), log it once; its name."""
        if index > 0:
            pause = min(self._cap, self._base * 2 ** (index - 1))
            self._sleep(pause * (0.5 + 0.5 * self._rand()))
        name = STEPS[index]
        if name not in self._logged:
            self._logged.append(name)
            log.warning("signerd.pkcs11.recover step=%s error=%s", name, error)
        return name

    def recovered(self) -> None:
        """A call succeeded: the outage (if any) is over."""
        self._wedged = 0
        if self._logged:
            steps = ",".join(s for s in self._logged if s in STEPS)
            log.warning("signerd.pkcs11.recovered steps=%s", steps)
            self._logged = []

    def exhausted(self, error: str, *, reachable: bool) -> None:
        """Every rung failed. ``reachable``: the library, token and login came back, and
        the call itself still failed with a token error."""
        if "unavailable" not in self._logged:
            self._logged.append("unavailable")
            log.warning("signerd.pkcs11.unavailable error=%s", error)
        if not reachable:
            self._wedged = 0
            return
        self._wedged += 1
        if self._wedged >= self._exit_after and not self.exiting:
            self.exiting = True
            log.critical(
                "signerd.pkcs11.exit error=%s climbs=%d detail=%s",
                error,
                self._wedged,
                "the token library fails after re-initialising; this process exits for "
                "the supervisor to start another",
            )
            self._exit(EXIT_TOKEN_WEDGED)
