"""Strict JSON for signing: refuse what cannot be canonicalised without ambiguity.

``parse`` accepts a JSON text only when its RFC 8785 (JCS) form denotes exactly
the same value, and refuses everything else with a documented code:

* ``payload_too_large``: the text is longer than the configured limit;
* ``malformed_json``: not UTF-8 or not JSON; a duplicate member name; NaN,
  Infinity or -Infinity; an integer beyond the I-JSON safe range
  (``|n| > 2**53 - 1``, also when written with a fraction or an exponent,
  like ``1e16``, up to ``1e21`` from where JCS writes an exponent); a non-integral number whose shortest IEEE 754 double
  form is not the number written (``0.10000000000000001``, ``1e400``); a
  string or member name holding a lone surrogate (``"\\ud800"``); nesting
  deeper than the configured limit.

``canonicalize`` then hands the value to the ``rfc8785`` package. Numbers that
denote the same value are written one way (``-0`` and ``0.0`` become ``0``,
``1E2`` becomes ``100``); that is a change of spelling, never of value.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal, InvalidOperation
from typing import Any

import rfc8785

from ..errors import MalformedJson, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "MAX_SAFE_INT",
    "canonical",
    "canonicalize",
    "check",
    "parse",
]

MAX_SAFE_INT = 2**53 - 1
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_BYTES = 256 * 1024
_EXPONENT_FROM = 1e21  # from here on, JCS (ECMAScript) writes numbers with an exponent


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedJson("duplicate member name")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise MalformedJson("NaN and Infinity are not JSON numbers")


def _int(text: str) -> int:
    if len(text) > 20:
        raise MalformedJson("integer outside the safe range (|n| <= 2^53 - 1)")
    value = int(text)
    if abs(value) > MAX_SAFE_INT:
        raise MalformedJson("integer outside the safe range (|n| <= 2^53 - 1)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJson("number out of the IEEE 754 double range")
    try:
        exact = Decimal(text) == Decimal(repr(value))
    except InvalidOperation as exc:  # pragma: no cover - json only hands valid numbers
        raise MalformedJson("not a number") from exc
    if not exact:
        raise MalformedJson("number does not round-trip through an IEEE 754 double")
    if MAX_SAFE_INT < abs(value) < _EXPONENT_FROM:
        # JCS writes these as integer digits, which are beyond the safe integer range
        raise MalformedJson("integer outside the safe range (|n| <= 2^53 - 1)")
    return value


def check(value: Any, max_depth: int) -> None:
    """Depth and lone surrogates, without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _string(item)
        elif isinstance(item, dict):
            if depth > max_depth:
                raise MalformedJson(f"nesting deeper than {max_depth}")
            for key, member in item.items():
                _string(key)
                stack.append((member, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise MalformedJson(f"nesting deeper than {max_depth}")
            stack.extend((member, depth + 1) for member in item)


def _string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedJson("string holds a lone surrogate") from exc


def parse(
    raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Parse ``raw`` strictly; raise MalformedJson or PayloadTooLarge (see the module doc)."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"JSON text over {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson("not UTF-8") from exc
    try:
        value = json.loads(
            text,
            object_pairs_hook=_pairs,
            parse_constant=_constant,
            parse_int=_int,
            parse_float=_float,
        )
    except MalformedJson:
        raise
    except RecursionError as exc:
        raise MalformedJson(f"nesting deeper than {max_depth}") from exc
    except ValueError as exc:
        raise MalformedJson() from exc
    check(value, max_depth)
    return value


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 form of a value that ``parse`` returned (or built from the same types)."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise MalformedJson("value cannot be canonicalised") from exc


def canonical(
    raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> bytes:
    """Parse strictly, then canonicalise."""
    return canonicalize(parse(raw, max_bytes=max_bytes, max_depth=max_depth))
