"""What each backend's stored metadata says of state-change and deletion times, including
metadata written before they were kept (unit tests of the pure mapping modules)."""

from __future__ import annotations

import json
import time

from signerd.backends import VersionState
from signerd.backends.pkcs11._objects import KeyMeta
from signerd.backends.vault._states import Record, Transit, key_info, record_of
from signerd.wire import KeyName

KEY = KeyName("acme", "feedback")


def test_pkcs11_metadata_without_times_reads_as_none_and_changes_stamp_them() -> None:
    """Old token metadata decodes with no times; a change stamps only the versions it moves,
    and pending_deletion keeps its deletion time until the version leaves that state."""
    old = {"format": 1, "seq": 3, "versions": {"1": {"state": "retired", "created_at": 100}}}
    meta = KeyMeta.decode(json.dumps(old).encode())
    assert (meta.changed, meta.deletion) == ({}, {})
    before = int(time.time())
    sched = meta.with_states({1: VersionState.PENDING_DELETION}, deletion_at=before + 60)
    again = KeyMeta.decode(sched.encode())
    assert again.versions[1] == (VersionState.PENDING_DELETION, 100)
    assert again.deletion == {1: before + 60} and again.changed[1] >= before
    same = again.with_states({1: VersionState.PENDING_DELETION}, deletion_at=before + 60)
    assert same.changed == again.changed  # no state change: no new stamp
    back = again.with_states({1: VersionState.RETIRED})
    assert back.deletion == {} and back.versions[1][0] is VersionState.RETIRED


def test_vault_record_without_times_reads_as_none_and_deletion_maps_to_pending() -> None:
    """An old KV record (no changed, no deletion) gives versions without times; a deletion
    time on a retired version makes it pending_deletion; on any other state it is ignored."""
    answer = {"data": {"data": {"format": 1, "retired": [2]}, "metadata": {"version": 4}}}
    old = record_of(answer)
    assert (old.changed, old.deletion, old.cas) == ({}, {}, 4)
    transit = Transit(
        latest=3,
        min_available=0,
        min_decryption=1,
        min_encryption=3,
        keys={v: (bytes(32), 100 * v) for v in (1, 2, 3)},
    )
    info = key_info(KEY, transit, old)
    assert [(v.state, v.state_changed_at, v.deletion_at) for v in info.versions] == [
        (VersionState.VERIFY_ONLY, None, None),
        (VersionState.RETIRED, None, None),
        (VersionState.ACTIVE, None, None),
    ]
    rec = Record(retired=frozenset({2}), changed={2: 500}, deletion={2: 900, 3: 950})
    assert record_of({"data": {"data": rec.to_json(), "metadata": {"version": 5}}}).deletion == {
        2: 900,
        3: 950,
    }
    info = key_info(KEY, transit, rec)
    v2, v3 = info.versions[1], info.versions[2]
    assert (v2.state, v2.state_changed_at, v2.deletion_at) == (
        VersionState.PENDING_DELETION,
        500,
        900,
    )
    assert (v3.state, v3.deletion_at) == (VersionState.ACTIVE, None)
