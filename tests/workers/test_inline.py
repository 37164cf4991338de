"""``SharedInline``: what one worker's token calls on its loop tell the others."""

from __future__ import annotations

import os
import time

import pytest

from signerd.workers import SharedInline
from signerd.workers._inline import SUSPECT_SECONDS

pytestmark = pytest.mark.timeout(30)


def test_a_call_stuck_in_another_worker_or_a_hung_mark_keeps_a_loop_out() -> None:
    """A worker may sign on its loop unless another worker's loop is in the token (over
    SUSPECT_SECONDS, 0: at all; its own never counts) or a guard marked the token hung; an
    answer clears the mark, and a worker starting in a slot clears that slot."""
    shared = SharedInline(2)
    shared.bind(0)
    assert shared.clear()
    shared.begin()  # worker 0, in a call
    time.sleep(SUSPECT_SECONDS * 2 + 0.01)
    assert shared.clear()  # its own call
    pid = os.fork()
    if pid == 0:  # worker 1, another process: sees worker 0's call through the mapping
        shared.bind(1)
        os._exit(0 if not shared.clear() else 1)
    assert os.waitpid(pid, 0)[1] == 0
    shared.bind(1)  # as worker 1 in this process: 0's call is suspect
    assert not shared.clear()
    shared.bind(0)  # a fresh worker 0: the dead one's call is over
    shared.bind(1)
    assert shared.clear()
    shared.bind(0)  # worker 0's call ends: worker 1 may go in
    shared.begin()
    shared.end()
    shared.bind(1)
    assert shared.clear()
    shared.hung()
    assert not shared.clear()
    shared.answered()
    assert shared.clear()
