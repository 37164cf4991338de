"""Destroy with a waiting period, on real daemons over SoftHSM and over OpenBao.

A destroy schedules the deletion of a retired version (``pending_deletion``
with ``deletion_at``); the version neither signs nor verifies (``retired_kid``);
cancel-deletion puts it back; the schedule survives a restart; the daemon
itself destroys a due version (once, in one process); ``now`` destroys at once
with the kid as confirmation only. Each step leaves its audit record.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.client import Client, KeyDescription, KeyVersion
from signerd.errors import ConfirmationRequired, InvalidState, RetiredKid
from signerd.testing import wait_until

from ..conftest import DaemonProcess, start_daemon, unique
from ..support.openbao import vault_backend_config

BACKENDS = ["hsm", "bao"]
DUE_TIMEOUT = 60.0  # seconds for the daemon to destroy a version due after 2 s (loaded machine)


def _overrides(backend: str, request: pytest.FixtureRequest, **keys: Any) -> dict[str, Any]:
    """Configuration overrides putting the daemon's keys on ``backend``."""
    out: dict[str, Any] = {"keys": {"default_backend": backend, **keys}}
    if backend == "bao":
        out["backends"] = {"bao": vault_backend_config(request.getfixturevalue("openbao_dev"))}
    return out


def _version(desc: KeyDescription, number: int) -> KeyVersion:
    (found,) = [v for v in desc.versions if v.version == number]
    return found


def _retired_key(c: Client, tenant: str) -> tuple[str, str, bytes]:
    """A key whose version 1 is retired, with a signature made by version 1."""
    key = f"{tenant}/k"
    made = _version(c.create_key(key), 1)
    assert made.state_changed_at is not None and made.state_changed_at >= made.created_at - 1
    sig = c.sign(key, b"signed by v1")
    assert sig.kid == f"{tenant}.k.v1"
    c.rotate(key)
    c.retire(key, 1)
    return key, sig.kid, sig.signature


def _destroyed(c: Client, key: str) -> bool:
    return _version(c.get_key(key), 1).state.value == "destroyed"


def _records(d: DaemonProcess, kid: str) -> list[tuple[str, str]]:
    return [
        (r["operation"], r["outcome"])
        for r in d.audit_records()
        if r.get("kid") == kid and r.get("operation") != "verify"
    ]


@pytest.fixture(params=BACKENDS)
def waiting(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[DaemonProcess, str]]:
    """A daemon with the default waiting period (7 days) on each backend."""
    overrides = _overrides(request.param, request)
    d = start_daemon(tmp_path, **overrides)
    try:
        yield d, request.param
    finally:
        d.stop()


def test_destroy_schedules_cancel_puts_back_and_a_restart_keeps_it(
    waiting: tuple[DaemonProcess, str], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """destroy -> pending_deletion at now + 7 days (no sign, verify retired_kid); the schedule
    survives a restart; cancel -> retired; now needs the kid; each change is audited."""
    d, backend = waiting
    tenant = unique("del")
    with Client(d.socket_path, timeout=30) as c:
        key, kid, signature = _retired_key(c, tenant)
        retired_at = _version(c.get_key(key), 1).state_changed_at
        assert retired_at is not None and abs(retired_at - time.time()) < 120
        before = time.time()
        v1 = _version(c.destroy(key, 1), 1)
        assert v1.state.value == "pending_deletion"
        assert v1.deletion_at is not None
        assert int(before) + 7 * 86400 <= v1.deletion_at <= time.time() + 7 * 86400
        assert v1.state_changed_at is not None and v1.state_changed_at >= int(before)
        with pytest.raises(RetiredKid):
            c.verify(kid, b"signed by v1", signature)
        assert c.sign(key, b"x").kid == f"{tenant}.k.v2"
        with pytest.raises(ConfirmationRequired):
            c.destroy(key, 1, now=True)
        with pytest.raises(ConfirmationRequired):
            c.destroy(key, 1, f"{tenant}.k.v2", now=True)
        with pytest.raises(InvalidState):
            c.destroy(key, 2)  # the active version
        with pytest.raises(InvalidState):
            c.destroy(key, 1)  # already scheduled
    d.stop()
    d2 = start_daemon(tmp_path, **_overrides(backend, request))
    try:
        with Client(d2.socket_path, timeout=30) as c:
            again = _version(c.get_key(key), 1)
            assert (again.state.value, again.deletion_at) == ("pending_deletion", v1.deletion_at)
            back = _version(c.cancel_deletion(key, 1), 1)
            assert (back.state.value, back.deletion_at) == ("retired", None)
            with pytest.raises(InvalidState):
                c.cancel_deletion(key, 1)
            with pytest.raises(RetiredKid):
                c.verify(kid, b"signed by v1", signature)
            c.destroy(key, 1)
            gone = _version(c.destroy(key, 1, kid, now=True), 1)
            assert gone.state.value == "destroyed"
        records = _records(d2, kid)  # the same trail files as the first daemon's
    finally:
        d2.stop()
    assert records.count(("schedule-deletion", "ok")) == 2
    assert records.count(("cancel-deletion", "ok")) == 1
    assert ("cancel-deletion", "invalid_state") in records
    assert records.count(("destroy", "confirmation_required")) == 2
    assert records.count(("destroy", "ok")) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_daemon_destroys_a_due_version_once(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """With keys.deletion_wait = 2 s, a scheduled version is destroyed by the daemon itself
    (no request), by one worker of two, with an intent and an ok audit record."""
    overrides = _overrides(backend, request, deletion_wait=2)
    d = start_daemon(tmp_path, server={"workers": 2}, **overrides)
    try:
        tenant = unique("due")
        with Client(d.socket_path, timeout=30) as c:
            key, kid, _ = _retired_key(c, tenant)
            scheduled = _version(c.destroy(key, 1), 1)
            assert scheduled.deletion_at is not None
            assert scheduled.deletion_at <= time.time() + 3

            wait_until(
                lambda: c.kid_info(kid).state.value == "destroyed",
                timeout=DUE_TIMEOUT,
                what="the daemon to destroy the due version",
                interval=0.1,
            )
            assert time.time() >= scheduled.deletion_at
            gone = _version(c.get_key(key), 1)
            assert gone.deletion_at is None and gone.state_changed_at is not None
            assert gone.state_changed_at >= scheduled.deletion_at

        def due_records() -> list[dict[str, Any]]:
            return [
                r
                for r in d.audit_records()
                if r.get("kid") == kid and r.get("operation") == "destroy"
            ]

        wait_until(lambda: len(due_records()) >= 2, timeout=10, what="the destroy's records")
    finally:
        d.stop()
    due = due_records()
    assert [r["outcome"] for r in due] == ["intent", "ok"]
    assert {r["reason"] for r in due} == {"deletion due"}
    assert due[0]["request_id"] == due[1]["request_id"]


def test_two_daemons_on_one_openbao_destroy_a_due_version_without_a_failure(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two daemons on one OpenBao both look for due versions: the version is destroyed, and
    neither records a failed destroy (the second finds it destroyed, or repeats a no-op)."""
    overrides = _overrides("bao", request, deletion_wait=2, refresh_interval=0.5)
    one = start_daemon(tmp_path / "one", server={"workers": 1}, **overrides)
    try:
        two = start_daemon(tmp_path / "two", server={"workers": 1}, **overrides)
        try:
            tenant = unique("race")
            with Client(one.socket_path, timeout=30) as c1, Client(two.socket_path) as c2:
                key, kid, _ = _retired_key(c1, tenant)
                c1.destroy(key, 1)
                wait_until(
                    lambda: c2.get_key(key).versions[0].state.value == "pending_deletion",
                    timeout=30,
                    what="the second daemon to see the schedule",
                )
                for c in (c1, c2):
                    wait_until(
                        functools.partial(_destroyed, c, key),
                        timeout=DUE_TIMEOUT,
                        what="both daemons to see the version destroyed",
                        interval=0.1,
                    )
                assert [v.state.value for v in c2.get_key(key).versions] == [
                    "destroyed",
                    "active",
                ]
        finally:
            two.stop()
    finally:
        one.stop()
    done = [
        (r["outcome"], r["reason"])
        for d in (one, two)
        for r in d.audit_records()
        if r.get("kid") == kid and r.get("operation") == "destroy"
    ]
    assert ("ok", "deletion due") in done
    assert {outcome for outcome, _ in done} <= {"intent", "ok"}
    assert "deletion_blocked" not in one.log_text() + two.log_text()


def test_a_blocked_due_destroy_is_recorded_once_and_left_pending(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On OpenBao a due version above an undestroyed one cannot be destroyed: the daemon
    records the refusal (intent, invalid_state) once, logs it, and backs off; the version
    stays pending_deletion."""
    d = start_daemon(tmp_path, server={"workers": 1}, **_overrides("bao", request, deletion_wait=1))
    try:
        tenant = unique("blk")
        with Client(d.socket_path, timeout=30) as c:
            key, _, _ = _retired_key(c, tenant)  # v1 retired, v2 active
            c.rotate(key)  # v3 active, v2 verify-only
            c.retire(key, 2)
            kid2 = f"{tenant}.k.v2"
            c.destroy(key, 2)

            def outcomes() -> list[str]:
                return [
                    r["outcome"]
                    for r in d.audit_records()
                    if r.get("kid") == kid2 and r.get("operation") == "destroy"
                ]

            wait_until(
                lambda: "invalid_state" in outcomes(), timeout=DUE_TIMEOUT, what="the refusal"
            )
            time.sleep(3)  # not a synchronisation: three more passes find nothing to do
            assert outcomes() == ["intent", "invalid_state"]
            assert _version(c.get_key(key), 2).state.value == "pending_deletion"
            assert d.log_text().count(f"signerd.deletion_blocked kid={kid2}") == 1
    finally:
        d.stop()
