"""The worker table: what a forked worker writes into its slot, every process reads."""

from __future__ import annotations

import os
import time

from signerd.workers import WorkerTable


def test_a_forked_worker_writes_its_slot_and_restarts_are_counted() -> None:
    """Slots written by forked children are read by the parent; a slot started twice shows
    one restart and its latest pid; a slot never started is not listed."""
    table = WorkerTable(3, started=1000.0)
    before = time.time()
    pids = []
    for index in (0, 2, 2):
        pid = os.fork()
        if pid == 0:
            table.serving(index, os.getpid())
            os._exit(0)
        os.waitpid(pid, 0)
        pids.append(pid)
    slots = table.slots()
    assert table.started == 1000.0
    assert [(s.index, s.pid, s.restarts) for s in slots] == [(0, pids[0], 0), (2, pids[2], 1)]
    assert all(before <= s.started <= time.time() for s in slots)
