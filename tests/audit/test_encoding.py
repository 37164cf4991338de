"""A record's line is the same bytes whichever way ``encode_record`` builds it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import signerd.audit._chain as chain
from signerd.audit import AuditEvent
from signerd.audit._chain import encode_record
from signerd.authz import Peer

_opt_text = st.none() | st.text(max_size=40)
_peers = st.builds(
    Peer,
    pid=st.integers(0, 2**22),
    uid=st.integers(-1, 2**32),
    gid=st.integers(-1, 2**32),
    unit=_opt_text,
    user=_opt_text,
    groups=st.lists(st.integers(0, 2**32), max_size=4).map(tuple),
)
_events = st.builds(
    AuditEvent,
    time=st.floats(0, 4e9),
    request_id=st.text(max_size=40),
    peer=_peers,
    operation=st.sampled_from(["sign", "verify", "rotate", "telemetry-verify"]),
    outcome=st.sampled_from(["ok", "intent", "permission_denied", "signature_invalid", "x\u00e9"]),
    tenant=_opt_text,
    key=_opt_text,
    kid=_opt_text,
    payload_sha256=st.lists(st.sampled_from(["ab" * 32, "0" * 64, "not hex"]), max_size=3).map(
        tuple
    ),
    reason=_opt_text,
    status=st.integers(0, 599),
)


@settings(max_examples=300, deadline=None)
@given(event=_events, seq=st.integers(1, 2**40), prev=st.text(max_size=64))
def test_the_built_line_is_the_general_encoders(event: AuditEvent, seq: int, prev: str) -> None:
    """The line built from pieces equals the general encoder's (sorted keys, compact, ASCII),
    for any text in any field, None fields, groups and security outcomes."""
    built = encode_record(event, seq, prev, {}, f"boot-{seq}", b"k" * 32)
    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(chain, "_fast_line", lambda *a: None)
        general = encode_record(event, seq, prev, {}, f"boot-{seq}", b"k" * 32)
    assert built == general
    assert (
        built
        == json.dumps(
            json.loads(built), sort_keys=True, separators=(",", ":"), ensure_ascii=True
        ).encode()
    )


def test_a_peer_of_unusual_types_takes_the_general_encoder() -> None:
    """A field not of its plain type (a bool status, an infinite time) is encoded as before."""
    peer = Peer(pid=1, uid=2, gid=3)
    odd = AuditEvent(time=float("inf"), request_id="r", peer=peer, operation="sign", outcome="ok")
    line = json.loads(encode_record(odd, 1, "p", {}, "b-1"))
    assert line["time"] == 0 and line["peer"]["uid"] == 2
    flagged = AuditEvent(
        time=1.5, request_id="r", peer=peer, operation="sign", outcome="ok", status=True
    )
    assert json.loads(encode_record(flagged, 1, "p", {}, "b-1"))["status"] is True
