"""signerctl keys destroy / cancel-deletion, and what keys show and keys list say of state
changes, scheduled deletions and rotation due dates, against a real daemon on SoftHSM."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator

import pytest

from signerd.testing import wait_until

from ..conftest import DaemonProcess, start_daemon, unique
from .test_cli import Ctl, kid_of

WAIT = 3600  # keys.deletion_wait of this module's daemon
MAX_AGE = {"due*/*": 1, "*/*": 30 * 86400}


@pytest.fixture(scope="module")
def aged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """A daemon with a one-hour deletion wait and max_active_age rules (1 s for due*/*)."""
    d = start_daemon(
        tmp_path_factory.mktemp("deletion"),
        keys={"deletion_wait": WAIT, "max_active_age": MAX_AGE},
    )
    yield d
    assert d.stop() == 0, d.log_text()


@pytest.fixture
def ctl(aged: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(aged, capsys)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def test_destroy_schedules_shows_the_time_and_cancel_deletion_undoes_it(ctl: Ctl) -> None:
    """keys destroy prints the deletion time and keys show the pending_deletion state with its
    state-change and deletion times; --now needs --confirm; cancel-deletion puts it back."""
    key = f"{unique('cd')}/k"
    ctl.ok("keys", "create", key)
    shown = ctl.json("keys", "show", key)
    assert shown["deletion_wait"] == WAIT
    assert shown["versions"][0]["deletion_at"] is None
    assert isinstance(shown["versions"][0]["state_changed_at"], int)
    ctl.ok("keys", "rotate", key)
    ctl.ok("keys", "retire", key, "1")
    before = time.time()
    text = ctl.ok("keys", "destroy", key, "1")
    doc = ctl.json("keys", "show", key)
    v1 = doc["versions"][0]
    assert v1["state"] == "pending_deletion"
    assert int(before) + WAIT <= v1["deletion_at"] <= time.time() + WAIT
    assert text.startswith(f"deletion scheduled at {_when(v1['deletion_at'])}\n")
    row = rf"{re.escape(kid_of(key, 1))}\s+pending_deletion\s+\S+Z\s+\S+\s+"
    row += rf"{_when(v1['state_changed_at'])}\s+{_when(v1['deletion_at'])}\s"
    assert re.search(row, ctl.ok("keys", "show", key)), ctl.ok("keys", "show", key)
    code, _, err = ctl("keys", "destroy", key, "1", "--now")
    assert code == os.EX_USAGE and "--confirm" in err
    code, _, err = ctl("keys", "destroy", key, "1", "--now", "--confirm", kid_of(key, 2))
    assert code != os.EX_OK and "confirmation_required" in err
    plan = ctl.json("keys", "cancel-deletion", key, "1", "--dry-run")
    assert plan["changes"] == [
        {"version": 1, "kid": kid_of(key, 1), "from": "pending_deletion", "to": "retired"}
    ]
    assert ctl.json("keys", "show", key)["versions"][0]["state"] == "pending_deletion"
    back = ctl.json("keys", "cancel-deletion", key, "1")["versions"][0]
    assert (back["state"], back["deletion_at"]) == ("retired", None)
    code, _, err = ctl("keys", "cancel-deletion", key, "1")
    assert code == os.EX_DATAERR and "invalid_state" in err
    ctl.ok("keys", "destroy", key, "1")
    gone = ctl.json("keys", "destroy", key, "1", "--now", "--confirm", kid_of(key, 1))
    assert gone["versions"][0]["state"] == "destroyed"


def test_show_and_list_say_when_rotation_is_due(ctl: Ctl) -> None:
    """keys show and keys list give the active version's created_at + max_active_age, and
    flag OVERDUE past it; a key no rule makes due soon is not flagged."""
    due, fresh = f"{unique('due')}/k", f"{unique('fresh')}/k"
    for key in (due, fresh):
        ctl.ok("keys", "create", key)
    doc = ctl.json("keys", "show", due)
    created = doc["versions"][0]["created_at"]
    assert doc["rotation_due"]["at"] == created + 1
    assert doc["rotation_due"]["max_active_age"] == 1
    wait_until(
        lambda: ctl.json("keys", "show", due)["rotation_due"]["overdue"],
        timeout=30,
        what="the key to be overdue",
        interval=0.2,
    )
    assert f"rotation due  {_when(created + 1)} OVERDUE" in ctl.ok("keys", "show", due)
    other = ctl.json("keys", "show", fresh)
    assert other["rotation_due"]["at"] == other["versions"][0]["created_at"] + 30 * 86400
    assert other["rotation_due"]["overdue"] is False
    listed = ctl.ok("keys", "list")
    assert re.search(rf"{re.escape(due)}\s.*{_when(created + 1)} OVERDUE\s+1\n", listed)
    line = next(x for x in listed.splitlines() if x.startswith(fresh))
    assert "OVERDUE" not in line
    assert _when(other["rotation_due"]["at"]) in line
