"""SharedConnections: the per-uid connection cap counted across worker processes."""

from __future__ import annotations

import os

from signerd.workers import SharedConnections


def test_cap_is_shared_by_every_worker_slot() -> None:
    """Connections admitted in two worker slots count against one cap for their uid."""
    table = SharedConnections(2)
    table.bind(0)
    assert all(table.admit(1000, 3) for _ in range(2))
    table.worker = 1  # the other slot, as a second worker would see it
    assert table.admit(1000, 3)
    assert not table.admit(1000, 3)
    assert table.admit(1001, 3)  # another uid has its own count
    table.release(1000)
    assert table.total(1000) == 2 and table.admit(1000, 3)


def test_a_restarted_worker_forgets_what_its_slot_counted() -> None:
    """bind() clears the slot's counts: a killed worker's connections stop counting."""
    table = SharedConnections(2)
    table.bind(1)
    for _ in range(4):
        assert table.admit(7, 4)
    assert not table.admit(7, 4)
    table.bind(1)  # the replacement worker in slot 1
    assert table.total(7) == 0 and table.admit(7, 4)


def test_counts_cross_a_fork() -> None:
    """A child process's admissions are seen by the parent (one shared mapping)."""
    table = SharedConnections(2)
    pid = os.fork()
    if pid == 0:
        table.bind(1)
        ok = all(table.admit(42, 5) for _ in range(5))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    table.bind(0)
    assert table.total(42) == 5 and not table.admit(42, 5)


def test_slots_of_uids_without_connections_are_reused() -> None:
    """More distinct uids than slots, one at a time: each is admitted and counted."""
    table = SharedConnections(1, slots=4)
    for uid in range(100, 120):
        assert table.admit(uid, 1) and table.total(uid) == 1
        assert not table.admit(uid, 1)
        table.release(uid)
        assert table.total(uid) == 0
