"""The forwarding modules on their own: the syslog form, the settings' checks, the saved
position, the lag flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from signerd._config import ConfigError, parse
from signerd.forwarding import (
    LagFlag,
    LagGate,
    Position,
    forwarding_settings,
    frame,
    load_state,
    message,
    save_state,
)
from signerd.forwarding import parse as parse_syslog

GOOD: dict[str, Any] = {"host": "127.0.0.1", "port": 6514, "checkpoint_key": "audit/cp"}


def test_a_message_is_rfc5424_and_reads_back() -> None:
    """A message has the RFC 5424 header, our structured data escaped, the record as MSG,
    and octet-counted framing counts its bytes; parse gives it all back."""
    record = b'{"seq":7,"outcome":"ok"}'
    msg = message(
        severity=6,
        when=0.25,
        hostname="host-a",
        procid="w1",
        msgid="audit",
        params={"chain": 'odd"]\\name', "seq": "7"},
        msg=record,
    )
    assert msg.startswith(b"<110>1 1970-01-01T00:00:00.250000Z host-a signerd w1 audit [")
    assert frame(msg) == str(len(msg)).encode() + b" " + msg
    got = parse_syslog(msg)
    assert got is not None
    assert (got.facility, got.severity, got.hostname, got.procid, got.msgid) == (
        13,
        6,
        "host-a",
        "w1",
        "audit",
    )
    assert got.params == {"chain": 'odd"]\\name', "seq": "7"}
    assert got.msg == record


def test_a_header_field_with_a_space_becomes_nil() -> None:
    """A hostname that is not PRINTUSASCII without spaces is sent as the NILVALUE."""
    msg = message(
        severity=6, when=0, hostname="a b", procid="w0", msgid="audit", params={}, msg=b"{}"
    )
    assert b" - signerd w0 audit " in msg


@pytest.mark.parametrize(
    "line",
    [b"", b"hello", b"<999>1 - - - - - - x", b"<13>2 - - - - - - x", b"<13>1 - - - - -"],
)
def test_what_is_not_rfc5424_is_none(line: bytes) -> None:
    """Lines that are not RFC 5424 messages (bad PRI, version, missing fields) are None."""
    assert parse_syslog(line) is None


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"host": ""}, "forwarding.host"),
        ({"port": 0}, "forwarding.port"),
        ({"port": "514"}, "forwarding.port"),
        ({"checkpoint_key": "no-slash"}, "forwarding.checkpoint_key"),
        ({"tls": "yes"}, "forwarding.tls"),
        ({"on_lag": "ignore"}, "forwarding.on_lag"),
        ({"max_lag_bytes": 10}, "forwarding.max_lag_bytes"),
        ({"checkpoint_records": 0}, "forwarding.checkpoint_records"),
        ({"checkpoint_interval": 0}, "forwarding.checkpoint_interval"),
        ({"hostname": "two words"}, "forwarding.hostname"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_settings_name_their_key(change: dict[str, Any], names: str) -> None:
    """Each bad [forwarding] value is a ValueError naming the key."""
    with pytest.raises(ValueError, match=names):
        forwarding_settings({**GOOD, **change}, "/var/lib/signerd/audit.jsonl")


def test_a_bad_forwarding_table_is_a_configuration_error() -> None:
    """The daemon's configuration refuses a bad [forwarding] table, naming the key."""
    doc = {
        "server": {"socket": "/run/signerd/s.sock"},
        "keys": {"default_backend": "hsm"},
        "backends": {"hsm": {"type": "pkcs11"}},
        "audit": {"path": "/var/log/signerd/audit.jsonl"},
        "forwarding": {**GOOD, "port": 0},
    }
    with pytest.raises(ConfigError, match=r"forwarding\.port"):
        parse(doc)
    doc["forwarding"] = GOOD
    assert parse(doc).forwarding is not None


def test_settings_defaults() -> None:
    """An empty table forwards nothing; a minimal one refuses past 64 MiB and keeps its
    position beside the trail."""
    assert forwarding_settings({}, "/x/audit.jsonl") is None
    s = forwarding_settings(GOOD, "/x/audit.jsonl")
    assert s is not None
    assert (s.on_lag, s.max_lag_bytes, s.state, s.tls) == (
        "refuse",
        64 << 20,
        "/x/forwarding.state",
        False,
    )


def test_state_round_trips_and_a_bad_one_is_empty(tmp_path: Path) -> None:
    """Positions saved are read back; a file that is not a state reads as none (logged)."""
    path = str(tmp_path / "forwarding.state")
    saved = {"audit.w0.jsonl": Position(1, 2, 300, 4, "a" * 64, "b-4", 1, "c" * 64, 4)}
    save_state(path, saved)
    assert load_state(path) == saved
    for bad in (b"[]", b"{", json.dumps({"c": {"offset": "1"}}).encode()):
        Path(path).write_bytes(bad)
        assert load_state(path) == {}
    assert load_state(str(tmp_path / "missing")) == {}


def test_the_lag_flag_is_seen_by_the_gate(tmp_path: Path) -> None:
    """The gate refuses before the forwarder's first look, follows its flag after (and
    reads the lag it published), and refuses again when it falls silent."""
    path = str(tmp_path / "forwarding.lag")
    LagFlag.reset(path)
    gate = LagGate(path, max_silence=0.2)
    assert gate.refusing() and not gate.began() and gate.lag() is None
    flag = LagFlag(path)
    flag.set(False, 1234)
    assert gate.began() and not gate.refusing() and gate.lag() == 1234
    flag.set(True)
    assert gate.refusing()
    flag.set(False)
    assert LagGate(path, max_silence=0.0).refusing()  # silent for longer than allowed
    flag.close()
