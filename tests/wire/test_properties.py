"""Property tests of the wire: names, kids, base64, envelope fields and both signing inputs,
and canonical JSON against an independent RFC 8785 reference written from the RFC's text."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signerd import errors
from signerd.errors import SignerdError
from signerd.wire import (
    MAX_SAFE_INT,
    PEER_KID_RE,
    KeyName,
    b64decode,
    b64encode,
    canonical_data,
    canonicalize,
    check_kid,
    check_nonce,
    check_schema,
    check_tenant,
    check_timestamp,
    feedback_input,
    parse_json,
    parse_kid,
    parse_object,
    parse_version,
    telemetry_input,
)

CODES = {
    cls.code
    for cls in vars(errors).values()
    if isinstance(cls, type) and issubclass(cls, SignerdError)
}
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _refused(exc: SignerdError) -> None:
    """A refusal is one of the closed set of wire codes, and a 4xx."""
    assert exc.code in CODES and 400 <= exc.status < 500, (exc.code, exc.status)


# --- an independent RFC 8785 reference --------------------------------------


def _es_number(x: float | int) -> str:
    """ECMAScript Number::toString (RFC 8785 section 3.2.2.3) from the shortest digits."""
    if isinstance(x, int):
        x = float(x)
    if x == 0:
        return "0"
    if x < 0:
        return "-" + _es_number(-x)
    _sign, digits, exponent = Decimal(repr(x)).normalize().as_tuple()
    s = "".join(map(str, digits))
    k = len(s)
    n = k + int(exponent)
    if k <= n <= 21:
        return s + "0" * (n - k)
    if 0 < n <= 21:
        return s[:n] + "." + s[n:]
    if -6 < n <= 0:
        return "0." + "0" * -n + s
    e = n - 1
    mantissa = s if k == 1 else s[0] + "." + s[1:]
    return f"{mantissa}e{'+' if e > 0 else '-'}{abs(e)}"


_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _es_string(text: str) -> str:
    """JSON.stringify of a string (RFC 8785 section 3.2.2.2)."""
    out = []
    for ch in text:
        if ch in _SHORT:
            out.append(_SHORT[ch])
        elif ord(ch) < 0x20:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def jcs(value: Any) -> bytes:
    """RFC 8785 canonical form: members sorted by their names' UTF-16 code units."""

    def go(v: Any) -> str:
        if v is None:
            return "null"
        if v is True:
            return "true"
        if v is False:
            return "false"
        if isinstance(v, int | float):
            return _es_number(v)
        if isinstance(v, str):
            return _es_string(v)
        if isinstance(v, list):
            return "[" + ",".join(go(i) for i in v) + "]"
        names = sorted(v, key=lambda name: name.encode("utf-16-be"))
        return "{" + ",".join(_es_string(n) + ":" + go(v[n]) for n in names) + "}"

    return go(value).encode("utf-8")


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
_numbers = st.one_of(
    st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT),
    st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: not (MAX_SAFE_INT < abs(f) < 1e21) and not (f.is_integer() and abs(f) >= 1e21)
    ),
)
_values = st.recursive(
    st.none() | st.booleans() | _numbers | _text,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_text, inner, max_size=5),
    max_leaves=25,
)


@PROPERTY
@given(_values)
def test_canonical_json_agrees_with_an_independent_rfc8785(value: Any) -> None:
    """signerd's canonical JSON equals the RFC 8785 reference on numbers, unicode and nesting."""
    assert canonicalize(value) == jcs(value)


@PROPERTY
@given(st.floats(allow_nan=False, allow_infinity=False, min_value=1e-320, max_value=1e300))
def test_numbers_agree_with_the_reference_and_keep_their_value(x: float) -> None:
    """Any double outside the unsafe-integer range: same text as the reference, same value."""
    if MAX_SAFE_INT < x < 1e21:
        return
    text = canonicalize(x)
    assert text == jcs(x)
    assert float(text) == x


# --- names, kids, versions, base64: refused with a code, or round-trip --------


@PROPERTY
@given(st.text(max_size=80) | st.from_regex(r"[a-z0-9][a-z0-9_-]{0,5}/[a-z0-9][a-z0-9_-]{0,5}\n?"))
def test_key_names_round_trip_or_are_refused(text: str) -> None:
    """Any text: KeyName.parse refuses it with a code, or str() gives the same text back."""
    try:
        name = KeyName.parse(text)
    except SignerdError as exc:
        _refused(exc)
    else:
        assert str(name) == text


@PROPERTY
@given(st.text(max_size=60) | st.from_regex(r"[a-z0-9]{1,4}\.[a-z0-9]{1,4}\.v[0-9]{1,12}\n?"))
def test_kids_and_versions_round_trip_or_are_refused(text: str) -> None:
    """Any text: a kid (and a version) is refused with a code, or rebuilt to the same text."""
    try:
        key, version = parse_kid(text)
    except SignerdError as exc:
        _refused(exc)
    else:
        assert key.kid(version) == text
    try:
        number = parse_version(text.rpartition("v")[2])
    except SignerdError as exc:
        _refused(exc)
    else:
        assert str(number) == text.rpartition("v")[2]


@PROPERTY
@given(st.text(max_size=40) | st.binary(max_size=30).map(lambda b: base64.b64encode(b).decode()))
def test_base64_fields_round_trip_or_are_refused(text: str) -> None:
    """Any field text: refused with invalid_base64, or the canonical encoding of what it decodes to."""
    try:
        raw = b64decode({"f": text}, "f")
    except SignerdError as exc:
        _refused(exc)
    else:
        assert b64encode(raw) == text


@PROPERTY
@given(st.binary(max_size=200) | _values.map(lambda v: json.dumps({"key": v}).encode()))
def test_request_bodies_are_refused_with_a_code_or_parse(raw: bytes) -> None:
    """Any body: refused with a 4xx code, or an object of the allowed fields that re-parses equal."""
    try:
        body = parse_object(raw, {"key", "data"}, {"key"})
    except SignerdError as exc:
        _refused(exc)
    else:
        assert body.keys() <= {"key", "data"} and "key" in body
        assert parse_json(json.dumps(body).encode(), max_bytes=1 << 20) == body


# --- envelope fields and signing inputs --------------------------------------

_timestamps = st.from_regex(r"0|[1-9][0-9]{0,11}", fullmatch=True)
_nonces = st.binary(min_size=16, max_size=64).map(
    lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
)
_tenants = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)
_schemas = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
_peer_kids = st.from_regex(PEER_KID_RE, fullmatch=True)


@PROPERTY
@given(st.text(max_size=140), st.sampled_from([check_nonce, check_schema, check_tenant, check_kid]))
def test_envelope_fields_are_refused_or_kept_unchanged(text: str, check: Any) -> None:
    """Any text in an envelope field: refused with a code, or accepted unchanged."""
    try:
        assert check(text) == text
    except SignerdError as exc:
        _refused(exc)


@PROPERTY
@given(_timestamps, _nonces, st.binary(max_size=64))
def test_telemetry_input_splits_back_one_way(timestamp: str, nonce: str, body: bytes) -> None:
    """A telemetry input gives back its timestamp, nonce and body: no two envelopes share one."""
    check_timestamp(timestamp)
    check_nonce(nonce)
    signed = telemetry_input(timestamp, nonce, body)
    ts, n, rest = signed.split(b".", 2)
    assert (ts.decode(), n.decode(), rest) == (timestamp, nonce, body)
    first = next(b for b in signed if not 0x30 <= b <= 0x39)
    assert first == ord(".")  # never the first non-digit of a feedback input


@PROPERTY
@given(_tenants, _timestamps, _nonces, _schemas, _peer_kids, _values)
def test_feedback_input_splits_back_one_way(
    tenant: str, signed_at: str, nonce: str, schema: str, kid: str, data: Any
) -> None:
    """A feedback input gives back every field and the data's value: no two envelopes share one."""
    for check, field in ((check_tenant, tenant), (check_nonce, nonce), (check_schema, schema)):
        check(field)
    check_kid(kid)
    signed = feedback_input(tenant, signed_at, nonce, schema, kid, canonical_data(data))
    parts = signed.split(b"|", 5)
    assert [p.decode() for p in parts[:5]] == [tenant, signed_at, nonce, schema, kid]
    assert parse_json(parts[5], max_bytes=1 << 20) == data
    first = next(b for b in signed if not 0x30 <= b <= 0x39)
    assert first != ord(".")


@PROPERTY
@given(_values)
def test_canonical_data_parses_back_to_the_same_value(value: Any) -> None:
    """The canonical form parses back to an equal value (1 and 1.0 are one number), so two
    different values never share one canonical form."""
    assert _numeric_equal(parse_json(canonical_data(value), max_bytes=1 << 20), value)


def _numeric_equal(a: Any, b: Any) -> bool:
    """Equal as JSON values, where 1 and 1.0 are one number."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_numeric_equal, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_numeric_equal(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)
