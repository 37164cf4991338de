"""Strict JSON, and its RFC 8785 (JCS) form: one set of rules for every end of the wire.

A JSON text is accepted only when its canonical form denotes exactly the same
value; everything else is refused with a documented code:

* ``payload_too_large``: the text is longer than the given limit (``parse_json``);
* ``malformed_json``: not UTF-8 or not JSON; a duplicate member name; NaN,
  Infinity or -Infinity; a number whose magnitude is beyond the I-JSON safe
  range (``|n| > 2**53 - 1``), however it is written (``9007199254740992``,
  ``1e16``, ``1E+21``, ``1000000000000000000000``, ``1e400`` are all refused);
  a non-integral number whose shortest IEEE 754 double form is not the number
  written (``0.10000000000000001``, ``1e-400``); a string or member name
  holding a lone surrogate (``"\\ud800"``); nesting deeper than the limit.

The verdict on a number depends only on its value, never on its spelling:
``1e2``, ``1E+2``, ``100.0`` and ``100`` are one number, accepted alike.

``parse_json`` applies all of them with a byte and a depth limit (the
federation's bodies); ``loads_strict`` applies the same rules to request
bodies whose size the server already bounds. ``check_json`` applies the rules
that can still be seen on an already-built value (the safe range of numbers,
lone surrogates, depth); a double that does not round-trip is visible
only in the text.

``canonicalize`` then hands the value to the ``rfc8785`` package. Numbers that
denote the same value are written one way (``-0`` and ``0.0`` become ``0``,
``1E2`` becomes ``100``); that is a change of spelling, never of value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

import rfc8785

from ..errors import MalformedJson, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_DEPTH",
    "MAX_SAFE_INT",
    "canonical",
    "canonical_data",
    "canonicalize",
    "check_json",
    "loads_strict",
    "parse_json",
]

MAX_SAFE_INT = 2**53 - 1
DEFAULT_MAX_DEPTH = 32
DEFAULT_MAX_BYTES = 256 * 1024
_UNSAFE = "number outside the safe range (|n| <= 2^53 - 1)"

# --- the rules, one copy: hooks for the parser, and the same checks on a value ---


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedJson("duplicate member name")
        out[key] = value
    return out


def _constant(name: str) -> Any:
    raise MalformedJson("NaN and Infinity are not JSON numbers")


def _safe_int(value: int) -> int:
    if abs(value) > MAX_SAFE_INT:
        raise MalformedJson(_UNSAFE)
    return value


def _safe_float(value: float) -> float:
    # one bound for every number, however written: also refuses NaN and the infinities
    if not abs(value) <= MAX_SAFE_INT:
        raise MalformedJson(_UNSAFE)
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # never hand a huge digit string to int()
        raise MalformedJson(_UNSAFE)
    return _safe_int(int(text))


def _float(text: str) -> float:
    value = _safe_float(float(text))
    try:
        exact = Decimal(text) == Decimal(repr(value))
    except InvalidOperation as exc:  # pragma: no cover - json only hands valid numbers
        raise MalformedJson("not a number") from exc
    if not exact:
        raise MalformedJson("number does not round-trip through an IEEE 754 double")
    return value


def _string(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedJson("string holds a lone surrogate") from exc


def check_json(value: Any, max_depth: int | None = DEFAULT_MAX_DEPTH) -> None:
    """The rules a built value still shows (numbers, lone surrogates, depth), without recursion.

    ``max_depth=None`` leaves the depth unbounded."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _string(item)
        elif isinstance(item, bool):
            pass
        elif isinstance(item, int):
            _safe_int(item)
        elif isinstance(item, float):
            _safe_float(item)
        elif isinstance(item, dict):
            if max_depth is not None and depth > max_depth:
                raise MalformedJson(f"nesting deeper than {max_depth}")
            for key, member in item.items():
                if isinstance(key, str):
                    _string(key)
                stack.append((member, depth + 1))
        elif isinstance(item, list):
            if max_depth is not None and depth > max_depth:
                raise MalformedJson(f"nesting deeper than {max_depth}")
            stack.extend((member, depth + 1) for member in item)


# one scanner for every text (``json.loads`` with hooks builds a decoder per call)
_scan: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder(
    object_pairs_hook=_pairs, parse_constant=_constant, parse_int=_int, parse_float=_float
).scan_once  # type: ignore[attr-defined]
_SPACE = " \t\n\r"  # JSON's whitespace (``json.decoder.WHITESPACE``)


def _decoded(text: str) -> Any:
    """``json.loads(text, ...)`` with the hooks above: what ``JSONDecoder.decode`` does."""
    if text.startswith("\ufeff"):  # refused by ``json.loads`` before decoding
        raise ValueError("a byte order mark")
    try:
        value, end = _scan(text, len(text) - len(text.lstrip(_SPACE)))
    except StopIteration:
        raise ValueError("no JSON value") from None
    if len(text.rstrip(_SPACE)) > end:
        raise ValueError("extra data")
    return value


def _loads(text: str, max_depth: int | None) -> Any:
    try:
        return _decoded(text)
    except MalformedJson:
        raise
    except RecursionError as exc:
        raise MalformedJson(
            f"nesting deeper than {max_depth}" if max_depth else "nesting too deep"
        ) from exc
    except ValueError as exc:
        raise MalformedJson() from exc


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson("not UTF-8") from exc


# --- entry points ---


def parse_json(
    raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> Any:
    """Parse ``raw`` strictly; raise MalformedJson or PayloadTooLarge (see the module doc)."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"JSON text over {max_bytes} bytes")
    value = _loads(_decode(raw), max_depth)
    check_json(value, max_depth)
    return value


def loads_strict(raw: bytes) -> Any:
    """The same rules as ``parse_json``, for a text the caller has already bounded in size;
    the depth is bounded only by the parser's recursion limit."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson("not UTF-8") from exc
    value = _loads(text, None)
    if "\\" in text:  # a lone surrogate can only arrive as an escape: UTF-8 cannot carry one
        check_json(value, None)
    return value


def canonicalize(value: Any) -> bytes:
    """The RFC 8785 form of a value that ``parse_json`` returned (or built from the same types)."""
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError):
        raise MalformedJson("value cannot be canonicalised") from None


def canonical(
    raw: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int = DEFAULT_MAX_DEPTH
) -> bytes:
    """Parse strictly, then canonicalise."""
    return canonicalize(parse_json(raw, max_bytes=max_bytes, max_depth=max_depth))


def canonical_data(data: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """The RFC 8785 form of an already-built value, after ``check_json``; MalformedJson otherwise."""
    check_json(data, max_depth)
    return canonicalize(data)
