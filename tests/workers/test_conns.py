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


def test_each_workers_total_is_counted_and_a_worker_ahead_knows_it() -> None:
    """Every admitted connection counts in its worker's total, whatever its uid; a worker two
    or more past the least loaded serving one is ``ahead`` (it leaves the next one to it)."""
    table = SharedConnections(2)
    assert table.totals() == (-1, -1)  # no worker accepts yet
    table.bind(0)
    table.serving()
    for uid in (1000, 1001, 1002):
        assert table.admit(uid, 8)
    assert table.totals() == (3, -1)
    assert not table.ahead()  # the other slot does not accept: nobody to leave it to
    table.worker = 1  # the other worker, as it would see the table
    table.serving()
    assert table.totals() == (3, 0)
    assert not table.ahead()
    table.worker = 0
    assert table.ahead()  # 3 against 0
    table.release(1000)
    table.release(1001)
    assert table.totals() == (1, 0) and not table.ahead()  # within one of the least


def test_a_refused_connection_and_a_closing_worker_do_not_count() -> None:
    """A uid over its cap adds nothing; a closing worker leaves the spread and its
    connections closing afterwards do not bring it back."""
    table = SharedConnections(2)
    table.bind(0)
    table.serving()
    assert table.admit(5, 1) and not table.admit(5, 1)
    assert table.totals()[0] == 1
    table.worker = 1
    table.serving()
    table.worker = 0
    table.serving(False)
    table.release(5)
    assert table.totals() == (-1, 0)
    table.bind(0)  # its replacement: not counted until it accepts
    assert table.totals() == (-1, 0)
    table.serving()
    assert table.totals() == (0, 0)


def test_a_full_table_still_counts_the_workers_totals() -> None:
    """With every uid slot held, a new uid is admitted uncounted per uid, but its worker's
    total counts it, and its release takes it off again."""
    table = SharedConnections(1, slots=2)
    table.bind(0)
    table.serving()
    assert table.admit(1, 5) and table.admit(2, 5) and table.admit(3, 5)
    assert table.total(3) == 0 and table.totals() == (3,)
    table.release(3)
    assert table.totals() == (2,)
