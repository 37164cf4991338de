"""Key names, kids, strict JSON and base64: what may reach a signing input."""

from __future__ import annotations

import pytest

from signerd.errors import InvalidBase64, InvalidKeyName, InvalidRequest, MalformedJson, UnknownKid
from signerd.wire import KeyName, b64decode, loads_strict, parse_kid, parse_object


@pytest.mark.parametrize("text", ["acme/feedback", "a/b", "a0/b_c-d", "x" * 63 + "/" + "y" * 63])
def test_valid_key_names_parse(text: str) -> None:
    """TENANT/NAME with [a-z0-9][a-z0-9_-]{0,62} parts parses and prints back unchanged."""
    assert str(KeyName.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "acme",
        "acme/",
        "/x",
        "Acme/x",
        "acme/x/y",
        "acme/-x",
        "_a/b",
        "a.b/c",
        "a/b c",
        "x" * 64 + "/y",
        7,
        None,
    ],
)
def test_invalid_key_names_are_refused(text: object) -> None:
    """Anything else is invalid_key_name."""
    with pytest.raises(InvalidKeyName):
        KeyName.parse(text)


def test_kid_round_trips_and_is_url_and_pipe_safe() -> None:
    """A kid splits back into its key and version and uses only [a-z0-9_.-]."""
    key = KeyName("acme-1", "feed_back")
    kid = key.kid(42)
    assert kid == "acme-1.feed_back.v42"
    assert parse_kid(kid) == (key, 42)
    assert set(kid) <= set("abcdefghijklmnopqrstuvwxyz0123456789_.-")


@pytest.mark.parametrize(
    "kid",
    ["acme.feedback", "acme.feedback.v0", "acme.feedback.v01", "a.b.c.v1", "a/b.v1", "A.b.v1", 5],
)
def test_malformed_kids_are_unknown(kid: object) -> None:
    """A malformed kid is unknown_kid, never a crash."""
    with pytest.raises(UnknownKid):
        parse_kid(kid)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1, "a": 2}',
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"a": 123456789012345678901234567890}',
        b'{"a": 1',
        b"\xff\xfe",
        b"[" * 100000 + b"]" * 100000,
    ],
)
def test_strict_json_refuses_what_python_json_accepts(raw: bytes) -> None:
    """Duplicate keys, NaN, Infinity, huge numbers, bad UTF-8 and deep nesting are malformed_json."""
    with pytest.raises(MalformedJson):
        loads_strict(raw)


def test_unknown_and_missing_fields_are_invalid_request() -> None:
    """parse_object refuses unknown fields, missing fields and non-objects."""
    with pytest.raises(InvalidRequest):
        parse_object(b'{"key": "a/b", "extra": 1}', {"key"}, {"key"})
    with pytest.raises(InvalidRequest):
        parse_object(b"{}", {"key"}, {"key"})
    with pytest.raises(InvalidRequest):
        parse_object(b"[1]", {"key"}, set())


@pytest.mark.parametrize("value", ["abc", "YQ", "YQ==\n", "YR==", "Y*==", "YQ=a", "-_8=", 3])
def test_non_canonical_base64_is_refused(value: object) -> None:
    """Only canonical standard base64 decodes; the rest is invalid_base64 (or invalid_request for non-strings)."""
    with pytest.raises((InvalidBase64, InvalidRequest)):
        b64decode({"data": value}, "data")


def test_canonical_base64_decodes() -> None:
    """Padded standard base64 decodes to its bytes."""
    assert b64decode({"data": "YQ=="}, "data") == b"a"
    assert b64decode({"data": ""}, "data") == b""
