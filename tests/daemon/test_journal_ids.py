"""Journal entries: a stable MESSAGE_ID per event type, fields under SIGNERD_*, IDs documented."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.audit._chain import journal_fields
from signerd.backends import KeyInfo, KeyVersion
from signerd.daemon._journal import JournalHandler
from signerd.daemon._logfmt import LogfmtFormatter
from signerd.keys._lifecycle import log_lifecycle
from signerd.server import log_request
from signerd.wire import MESSAGE_IDS, KeyName, VersionState

from ..conftest import ROOT

_STANDARD = {"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "LOGGER", "MESSAGE_ID"}
Sent = list[tuple[str, dict[str, str]]]


@pytest.fixture
def sent() -> Iterator[Sent]:
    """What signerd's journal handler would send, for the signerd loggers."""
    captured: Sent = []
    handler = JournalHandler(lambda msg, **kw: captured.append((msg, kw)))
    handler.setFormatter(LogfmtFormatter(prefix=False))
    root = logging.getLogger("signerd")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        yield captured
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _version(n: int, state: VersionState) -> KeyVersion:
    return KeyVersion(n, f"acme.k.v{n}", state, b"\x01" * 32, 0)


def _info(key: KeyName, states: tuple[VersionState, ...]) -> KeyInfo:
    return KeyInfo(key, tuple(_version(i + 1, s) for i, s in enumerate(states)))


def test_each_lifecycle_event_has_its_message_id_and_signerd_fields(sent: Sent) -> None:
    """create, rotate, promote, retire, a scheduled deletion and destroy each send their own
    MESSAGE_ID and SIGNERD_* fields."""
    key = KeyName("acme", "k")
    steps = [
        (None, (VersionState.ACTIVE,)),
        ((VersionState.ACTIVE,), (VersionState.ACTIVE, VersionState.PENDING)),
        (
            (VersionState.ACTIVE, VersionState.PENDING),
            (VersionState.VERIFY_ONLY, VersionState.ACTIVE),
        ),
        (
            (VersionState.VERIFY_ONLY, VersionState.ACTIVE),
            (VersionState.RETIRED, VersionState.ACTIVE),
        ),
        (
            (VersionState.RETIRED, VersionState.ACTIVE),
            (VersionState.PENDING_DELETION, VersionState.ACTIVE),
        ),
        (
            (VersionState.PENDING_DELETION, VersionState.ACTIVE),
            (VersionState.DESTROYED, VersionState.ACTIVE),
        ),
    ]
    for before, after in steps:
        old = None if before is None else _info(key, before)
        log_lifecycle(old, _info(key, after), "hsm")
    events = ["key_created", "key_rotated", "key_promoted", "key_retired"]
    events += ["key_deletion_scheduled", "key_destroyed"]
    assert [fields["MESSAGE_ID"] for _, fields in sent] == [MESSAGE_IDS[e] for e in events]
    assert [fields["SIGNERD_EVENT"] for _, fields in sent] == events
    for msg, fields in sent:
        assert msg.startswith("signerd.key_") and fields["SIGNERD_BACKEND"] == "hsm"
        assert fields["SIGNERD_KEY"] == "acme/k" and fields["PRIORITY"] == "6"
        assert all(k in _STANDARD or k.startswith("SIGNERD_") for k in fields), fields


def test_a_refused_lifecycle_request_is_an_info_event_with_its_id(sent: Sent) -> None:
    """A refused rotate is logged at info (even off the journal) with the key_refused MESSAGE_ID."""
    log_request("rid-9", "rotate", "invalid_state", 409)
    log_request("rid-10", "sign", "unknown_key", 404)  # not a lifecycle request: debug
    ((msg, fields),) = sent
    assert msg == "signerd.key_refused rid=rid-9 op=rotate outcome=invalid_state status=409"
    assert fields["MESSAGE_ID"] == MESSAGE_IDS["key_refused"]
    assert all(k in _STANDARD or k.startswith("SIGNERD_") for k in fields), fields


def test_audit_journal_entries_carry_their_message_id() -> None:
    """An audit record copied to the journal carries the audit_record MESSAGE_ID."""
    line = (
        b'{"kid":"","key":"","operation":"sign","outcome":"ok","payload_hmac":[],'
        b'"peer":{"gid":0,"groups":[],"pid":1,"uid":0,"unit":"","user":""},"prev":"x",'
        b'"reason":"","record_id":"1","request_id":"r","seq":1,"status":200,"tenant":"","v":2}'
    )
    assert journal_fields(line)["MESSAGE_ID"] == MESSAGE_IDS["audit_record"]


def test_message_ids_are_distinct_uuids_and_documented() -> None:
    """Every MESSAGE_ID is a distinct 128-bit hex id, listed with its event in docs/api-and-logs.md."""
    assert len(set(MESSAGE_IDS.values())) == len(MESSAGE_IDS)
    doc = Path(ROOT / "docs" / "api-and-logs.md").read_text()
    for event, ident in MESSAGE_IDS.items():
        assert re.fullmatch(r"[0-9a-f]{32}", ident)
        assert re.search(rf"^\| `{event}` \| `{ident}` \|", doc, re.M), event
