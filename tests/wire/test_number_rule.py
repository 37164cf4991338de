"""One rule for numbers: the verdict depends on the value, never on how the number is written,
and the OpenAPI document's JsonValue states the same bound the strict parser applies."""

from __future__ import annotations

import json
from decimal import Decimal
from importlib import resources
from typing import Any

import jsonschema_rs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from signerd.errors import MalformedJson
from signerd.wire import MAX_SAFE_INT, canonical, loads_strict

OPENAPI = json.loads(resources.files("signerd").joinpath("openapi.json").read_text("utf-8"))
JSON_VALUE = OPENAPI["components"]["schemas"]["JsonValue"]
(NUMBER,) = [s for s in JSON_VALUE["anyOf"] if s.get("type") == "number"]
# the validator schemathesis itself uses to judge a request against the document
NUMBER_SCHEMA = jsonschema_rs.validator_for(NUMBER)


def _spellings(mantissa: int, exponent: int) -> list[str]:
    """The value mantissa * 10**exponent written in several JSON number forms."""
    plain = format(Decimal(mantissa).scaleb(exponent), "f")
    forms = [
        f"{mantissa}e{exponent}",
        f"{mantissa}E{exponent:+d}",
        plain,
        plain if "." in plain else plain + ".0",
        plain + "0" if "." in plain else plain + ".000",
    ]
    for shift in (1, 3):
        forms.append(f"{mantissa * 10**shift}e{exponent - shift}")
    return forms


def _verdict(text: str) -> tuple[str, str]:
    """("ok", canonical form) or ("refused", code and message) for one number text."""
    try:
        return "ok", canonical(text.encode()).decode()
    except MalformedJson as exc:
        return "refused", f"{exc.code}: {exc}"


def _expected(value: Decimal) -> bool:
    """The documented rule on the value: within +-(2^53 - 1), and a double's shortest form."""
    if abs(value) > MAX_SAFE_INT:
        return False
    return value == value.to_integral_value() or Decimal(repr(float(value))) == value


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=-(10**24), max_value=10**24), st.integers(min_value=-30, max_value=30))
@example(1, 21)  # 1e21, 1E+21, 1000000000000000000000
@example(9007199254740991, 0)
@example(9007199254740992, 0)
@example(90071992547409914, -1)  # rounds to 2^53 - 1, but is not it
@example(1, -1)
@example(10000000000000001, -17)  # 0.10000000000000001
@example(1, 400)
def test_spelling_does_not_change_the_verdict(mantissa: int, exponent: int) -> None:
    """Every spelling of one value, bare or nested, gets one verdict: the documented rule's."""
    value = Decimal(mantissa).scaleb(exponent)
    verdicts = {_verdict(text) for text in _spellings(mantissa, exponent)}
    assert len(verdicts) == 1, verdicts
    ((kind, detail),) = verdicts
    assert (kind == "ok") == _expected(value), (value, detail)
    if kind == "ok":
        assert Decimal(detail) == value  # canonical JSON changes the spelling, never the value
    else:
        assert detail.startswith("malformed_json: ")
    nested = '{"a":[{"b":' + _spellings(mantissa, exponent)[1] + "}]}"
    try:
        got = ("ok", canonical(nested.encode()).decode())
    except MalformedJson as exc:
        got = ("refused", f"{exc.code}: {exc}")
    assert got == (kind, '{"a":[{"b":' + detail + "}]}" if kind == "ok" else detail)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=-(10**24), max_value=10**24), st.integers(min_value=-30, max_value=30))
@example(1, 21)
@example(9007199254740991, 0)
@example(-9007199254740992, 0)
@example(15, 299)  # 1.5e300
def test_the_server_accepts_what_the_openapi_document_allows(mantissa: int, exponent: int) -> None:
    """A number the server accepts is valid against JsonValue, and one it refuses either breaks
    the document's bound or is not its double's shortest form (stated in the description)."""
    text = f"{mantissa}e{exponent}"
    value = Decimal(mantissa).scaleb(exponent)
    lax: Any = json.loads(text)  # what a client that generated from the schema would hold
    shortest = value == value.to_integral_value() or Decimal(repr(float(value))) == value
    try:
        loads_strict(text.encode())
    except MalformedJson:
        assert not (NUMBER_SCHEMA.is_valid(lax) and shortest), text
    else:
        assert NUMBER_SCHEMA.is_valid(lax), text


def test_openapi_states_the_bound() -> None:
    """JsonValue's numbers are bounded by +-(2^53 - 1), and its description says the bound holds
    however a number is written."""
    assert NUMBER["minimum"] == -MAX_SAFE_INT and NUMBER["maximum"] == MAX_SAFE_INT
    description = JSON_VALUE["description"]
    assert "by value, however written" in description
    assert "1e21, 1E+21 and 1000000000000000000000 are all refused" in description


@pytest.mark.parametrize("text", ["1e21", "1E+21", "1000000000000000000000", "1.5e300"])
def test_large_numbers_in_request_bodies_are_refused(text: str) -> None:
    """A request body holding a number beyond the bound is malformed_json, whatever its spelling."""
    with pytest.raises(MalformedJson):
        loads_strict(b'{"data": {"n": [' + text.encode() + b"]}}")
