"""Security events in the audit trail and journald; a damaged trusted-keys file answers 503."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signerd.audit import AuditEvent
from signerd.audit._chain import encode_record as _encode
from signerd.audit._chain import journal_fields as _journal_fields
from signerd.authz import Peer
from signerd.client import Client
from signerd.errors import BackendUnavailable
from signerd.federation._trust import TrustedKeys

from ..conftest import unique
from ..support.federation import Api, Producer, federation_daemon


def _event(outcome: str, status: int) -> AuditEvent:
    return AuditEvent(
        time=1795000000.0,
        request_id="r1",
        peer=Peer(1, 1000, 1000),
        operation="verify",
        outcome=outcome,
        tenant="acme",
        kid="p-1",
        status=status,
    )


@pytest.mark.parametrize(
    ("outcome", "status", "security", "priority"),
    [
        ("ok", 200, False, "6"),
        ("replayed_nonce", 409, True, "4"),
        ("tenant_mismatch", 403, True, "4"),
        ("invalid_signature", 401, True, "4"),
        ("key_exists", 409, False, "5"),
        ("schema_mismatch", 422, False, "5"),
        ("nonce_store_unavailable", 503, False, "3"),
    ],
)
def test_security_mark_and_journald_priority(
    outcome: str, status: int, security: bool, priority: str
) -> None:
    """Signature, mapping and replay refusals carry security: true and go to journald at priority 4."""
    line = _encode(_event(outcome, status), 1, "0" * 64, {})
    record = json.loads(line)
    assert record.get("security", False) is security
    assert ("security" in record) is security
    assert _journal_fields(line)["PRIORITY"] == priority


def test_damaged_trusted_keys_file_is_503(tmp_path: Path) -> None:
    """An unreadable trusted-keys.json refuses lookups and changes with 503, never a 500."""
    (tmp_path / "trusted-keys.json").write_text("{not json")
    trusted = TrustedKeys(str(tmp_path))
    with pytest.raises(BackendUnavailable):
        trusted.lookup("acme", "k")
    with pytest.raises(BackendUnavailable):
        trusted.add("acme", "k", b"\x01" * 32)
    assert (tmp_path / "trusted-keys.json").read_text() == "{not json"  # not overwritten


def test_damaged_trusted_keys_file_through_the_daemon(tmp_path: Path) -> None:
    """A daemon whose trusted-keys.json is damaged answers peer verifies and listings with 503."""
    base = tmp_path / "d"
    d = federation_daemon(base)
    try:
        api = Api(d)
        tenant = unique("dm")
        p = Producer.new("p-damaged")
        api.trust(tenant, p)
        (base / "state" / "trusted-keys.json").write_text("[]")
        reply = api("POST", "/v1/telemetry/verify", p.telemetry(tenant, b"{}"))
        assert (reply.status, reply.code) == (503, "backend_unavailable")
        reply = api("GET", f"/v1/trusted-keys?tenant={tenant}")
        assert (reply.status, reply.code) == (503, "backend_unavailable")
    finally:
        d.stop()


def test_envelope_signs_write_an_intent_record_before_their_outcome(tmp_path: Path) -> None:
    """Telemetry and feedback signs write an intent record (kid, hash) before their outcome."""
    d = federation_daemon(tmp_path / "d")
    try:
        key = f"{unique('in')}/k"
        client = Client(str(d.socket_path))
        client.create_key(key)
        signed = client.telemetry_sign(key, b'{"a":1}')
        envelope = client.feedback_sign(key, "s.v1", {"a": 1})
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    signs = [r for r in d.audit_records() if r["operation"] == "sign"]
    assert [r["outcome"] for r in signs] == ["intent", "ok", "intent", "ok"], signs
    for intent, ok, kid in ((signs[0], signs[1], signed.kid), (signs[2], signs[3], envelope.kid)):
        assert intent["request_id"] == ok["request_id"]
        assert intent["kid"] == ok["kid"] == kid
        assert intent["payload_hmac"] == ok["payload_hmac"] and len(ok["payload_hmac"]) == 1
