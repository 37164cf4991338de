"""Strict canonical JSON: each refused case, RFC 8785 edge cases, and Hypothesis properties."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from signerd.errors import MalformedJson, PayloadTooLarge
from signerd.wire import MAX_SAFE_INT, canonical, canonicalize
from signerd.wire import parse_json as parse

REFUSALS = (MalformedJson, PayloadTooLarge)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1, "a": 1}',
        b'{"a": {"b": 1, "b": 2}}',
        b"NaN",
        b"[Infinity]",
        b"[-Infinity]",
        b"9007199254740992",
        b"-9007199254740992",
        b"123456789012345678901234567890",
        b"1e16",
        b"9007199254740992.0",
        b"1e21",
        b"1E+21",
        b"-1e21",
        b"1000000000000000000000",
        b"1.5e300",
        b'{"a": [{"b": 1e21}]}',
        b"0.10000000000000001",
        b"1.00000000000000001",
        b"1e400",
        b"-1e400",
        b'"\\ud800"',
        b'{"\\udfff": 1}',
        b'"\\ude00\\ud83d"',
        b"[" * 33 + b"]" * 33,
        b'{"a":' * 33 + b"1" + b"}" * 33,
        b"\xff",
        b"",
        b"{",
        b"[1,]",
        b"01",
        b"'a'",
    ],
)
def test_refused_cases(text: bytes) -> None:
    """Each ambiguous or malformed text is refused with malformed_json."""
    with pytest.raises(MalformedJson) as info:
        canonical(text)
    assert info.value.code == "malformed_json" and info.value.status == 400


def test_size_limit() -> None:
    """Texts over the size limit are refused with payload_too_large (413)."""
    with pytest.raises(PayloadTooLarge) as info:
        canonical(b'"' + b"x" * 100 + b'"', max_bytes=64)
    assert (info.value.code, info.value.status) == ("payload_too_large", 413)
    assert canonical(b'"' + b"x" * 62 + b'"', max_bytes=64) == b'"' + b"x" * 62 + b'"'


def test_depth_limit_is_exact() -> None:
    """Nesting up to max_depth is accepted; one more level is refused."""
    assert canonical(b"[" * 32 + b"]" * 32) == b"[" * 32 + b"]" * 32
    with pytest.raises(MalformedJson):
        canonical(b"[" * 5 + b"]" * 5, max_depth=4)


def test_huge_nesting_is_refused_not_a_crash() -> None:
    """100,000 levels of nesting are malformed_json, not a RecursionError."""
    with pytest.raises(MalformedJson):
        canonical(b"[" * 100_000 + b"]" * 100_000, max_bytes=1 << 20)


def test_member_order_is_by_utf16_code_units() -> None:
    """RFC 8785 section 3.2.3's example: names sort by UTF-16 code units, not code points."""
    text = json.dumps(
        {
            "\u20ac": "Euro Sign",
            "\r": "Carriage Return",
            "\ufb33": "Hebrew Letter Dalet With Dagesh",
            "1": "One",
            "\U0001f600": "Emoji: Grinning Face",
            "\u0080": "Control",
            "\u00f6": "Latin Small Letter O With Diaeresis",
        }
    ).encode()
    order = list(json.loads(canonical(text)))
    assert order == ["\r", "1", "\u0080", "\u00f6", "\u20ac", "\U0001f600", "\ufb33"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"-0", b"0"),
        (b"-0.0", b"0"),
        (b"0.0", b"0"),
        (b"1.0", b"1"),
        (b"1E2", b"100"),
        (b"1e+2", b"100"),
        (b"1.5E-7", b"1.5e-7"),
        (b"9.007199254740991e15", b"9007199254740991"),
        (b"1e-7", b"1e-7"),
        (b"0.000001", b"0.000001"),
        (b"123e-2", b"1.23"),
        (b"5e-324", b"5e-324"),
        (b"9007199254740991", b"9007199254740991"),
        (b"-9007199254740991", b"-9007199254740991"),
        (b'"\\u00e9\\n\\u001f"', '"\u00e9\\n\\u001f"'.encode()),
        (b'{ "b" : [ 1 , 2 ] , "a" : null }', b'{"a":null,"b":[1,2]}'),
    ],
)
def test_number_and_string_forms(text: bytes, expected: bytes) -> None:
    """-0 becomes 0, exponent forms become ECMAScript's shortest form, strings keep their value."""
    assert canonical(text) == expected


# --- properties --------------------------------------------------------------

_safe_ints = st.integers(min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT)
_floats = st.floats(
    allow_nan=False, allow_infinity=False, min_value=-MAX_SAFE_INT, max_value=MAX_SAFE_INT
)
_scalars = st.none() | st.booleans() | _safe_ints | _floats | st.text()
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=30,
)
_number_text = st.from_regex(
    r"-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True
)


def _lone_surrogate_or_deep(value: Any, depth: int) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, list):
        return depth > 32 or any(_lone_surrogate_or_deep(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return depth > 32 or any(
            _lone_surrogate_or_deep(k, depth) or _lone_surrogate_or_deep(v, depth + 1)
            for k, v in value.items()
        )
    return False


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b and not (isinstance(a, float) and math.isnan(a))
    return bool(a == b)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_text_is_refused_or_canonicalised(text: str) -> None:
    """Any text: refused with a documented code, or canonicalised; never another exception."""
    raw = text.encode("utf-8", "surrogatepass")
    try:
        out = canonical(raw)
    except REFUSALS:
        return
    assert canonical(out) == out


@settings(max_examples=400, deadline=None)
@given(_values, st.booleans(), st.sampled_from([None, 0, 2]))
def test_json_texts_round_trip(value: Any, ascii_only: bool, indent: int | None) -> None:
    """JSON texts of generated values canonicalise; the result is idempotent and parses to the same value."""
    raw = json.dumps(value, ensure_ascii=ascii_only, indent=indent).encode("utf-8", "surrogatepass")
    try:
        out = canonical(raw)
    except REFUSALS:
        assert _lone_surrogate_or_deep(value, 1)  # the only reasons to refuse these values
        return
    assert canonical(out) == out
    assert _same(parse(out), parse(raw))
    assert _same(parse(out), value)


@settings(max_examples=500, deadline=None)
@given(_number_text)
def test_number_texts(text: str) -> None:
    """Any JSON number: refused, or canonical with the same value, idempotent."""
    try:
        out = canonical(text.encode())
    except REFUSALS:
        return
    assert canonical(out) == out
    assert float(out) == float(text)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(min_size=1), _safe_ints, min_size=1, max_size=8))
def test_member_order_property(value: dict[str, int]) -> None:
    """Canonical member order is the UTF-16 code unit order of the names."""
    try:
        out = canonicalize(value)
    except MalformedJson:
        return  # a name with a lone surrogate
    names = list(json.loads(out))
    assert names == sorted(value, key=lambda k: k.encode("utf-16-be"))
