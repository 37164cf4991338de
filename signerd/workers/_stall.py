"""Blocking calls on a worker's event loop, and what happens when one never returns.

A worker makes its token signatures, and a lone caller's audit write, on the
event loop's own thread: handing each one to another thread and back costs a
large share of a signature's time on a small machine (one caller: about 865
against 1,200 us per request, measured side by side). Such a call cannot be
cancelled. When one
has not returned by its deadline, ``StallGuard``'s thread gives every request
the worker is answering a last 503 (``backend_unavailable`` for the token,
``audit_unavailable`` for the audit file), logs ``signerd.worker_stalled`` and
ends the process with ``EXIT_STALLED``; the supervisor starts a fresh worker
(a new library, session and login) while the other workers keep serving. A
request that names its own last answer gets that instead: an admin change
under way is answered 500 ``outcome_unknown``, never a refusal, since it may
have happened (``_idempotency``); its retry with the same Idempotency-Key, on
another worker, learns which.

With ``shared`` (``SharedInline``), the workers see each other's token calls on
their loops: a worker signs in its executor instead while another's loop is
stuck in the token, or after a guard fired until the token answers again.

Arming and disarming cost an attribute store and an uncontended lock (no
wake-up of another thread); the guard's thread looks at the deadline every
``poll`` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import NoReturn, TypeVar

from ..errors import SignerdError
from ._inline import SharedInline

__all__ = ["EXIT_STALLED", "StallGuard"]

log = logging.getLogger("signerd.worker")

EXIT_STALLED = 75  # EX_TEMPFAIL: a call on the loop did not return; restart the worker
_T = TypeVar("_T")

LastAnswers = Callable[[SignerdError], int]  # answer every request in progress; how many


class StallGuard:
    """Deadlines for blocking calls made on the event loop's thread."""

    def __init__(
        self,
        last_answers: LastAnswers,
        *,
        poll: float = 0.05,
        exit: Callable[[int], object] = os._exit,
        shared: SharedInline | None = None,
    ) -> None:
        self._last_answers = last_answers
        self._shared = shared
        self._poll = poll
        self._exit = exit
        self._armed: tuple[float, str, type[SignerdError]] | None = None
        self._ended = threading.Event()  # set once ``exit`` returned (only in tests)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.fired = False
        self._thread = threading.Thread(target=self._watch, name="signerd-stall", daemon=True)
        self._thread.start()

    def call(
        self, fn: Callable[[], _T], seconds: float, what: str, error: type[SignerdError]
    ) -> _T:
        """``fn()`` on this thread; if it has not returned after ``seconds``, the worker ends
        (its requests answered with ``error``) and this call never returns."""
        self._armed = (time.monotonic() + seconds, what, error)
        shared = self._shared
        if shared is not None:
            shared.begin()
        try:
            return fn()
        finally:
            with self._lock:  # either the call is over or the guard has fired, never both
                self._armed = None
                fired = self.fired
            if fired:
                self._hold(error)
            if shared is not None:
                shared.end()

    def clear(self) -> bool:
        """Whether a token call may be made on the loop now (``SharedInline.clear``)."""
        return self._shared is None or self._shared.clear()

    def answered(self) -> None:
        """A token call answered (elsewhere than on the loop): the token is not hung."""
        if self._shared is not None:
            self._shared.answered()

    def _hold(self, error: type[SignerdError]) -> NoReturn:
        """The guard has answered for this call: nothing more may leave this process."""
        self._ended.wait()
        raise error()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1.0)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                armed = self._armed
                if armed is None or time.monotonic() <= armed[0]:
                    continue
                self.fired = True
            self._fire(armed[1], armed[2])
            return

    def _fire(self, what: str, error: type[SignerdError]) -> None:
        answered = 0
        if self._shared is not None and what == "token":
            self._shared.hung()  # first: the other workers keep their loops out of it
        try:
            answered = self._last_answers(error())
        finally:
            log.critical(
                "signerd.worker_stalled call=%s answered=%d detail=%s",
                what,
                answered,
                f"a {what} call did not return in time; this worker exits and the supervisor "
                "starts another",
            )
            self._exit(EXIT_STALLED)
            self._ended.set()
