"""Reading the fields of an answer; anything off the protocol is InternalError."""

from __future__ import annotations

import base64
import binascii
from typing import Any, TypeVar

from ..errors import InternalError
from ..wire import VersionState, decimal_seconds

T = TypeVar("T")


def _field(doc: Any, name: str, kind: type[T]) -> T:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InternalError(f"answer outside the protocol: field {name!r}")
    return value


def _optional_str(doc: Any, name: str) -> str | None:
    value = doc.get(name) if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


def _state(doc: Any) -> VersionState:
    try:
        return VersionState(_field(doc, "state", str))
    except ValueError:
        raise InternalError("answer outside the protocol: field 'state'") from None


def _seconds(doc: Any, name: str) -> int:
    value = doc.get(name) if isinstance(doc, dict) else None
    try:
        return decimal_seconds(value)
    except ValueError:
        raise InternalError(f"answer outside the protocol: field {name!r}") from None


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InternalError("answer outside the protocol: base64") from None


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _jwk(doc: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in _field(doc, "jwk", dict).items()}


def _optional_int(doc: Any, name: str) -> int | None:
    """An integer field that may be null or absent (a daemon before it was answered)."""
    value = doc.get(name) if isinstance(doc, dict) else None
    return None if value is None else _field(doc, name, int)


def _number(doc: Any, name: str) -> float | None:
    """A number field that may be absent (a daemon before it was answered)."""
    value = doc.get(name) if isinstance(doc, dict) else None
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise InternalError(f"answer outside the protocol: field {name!r}")
    return float(value)


def _optional(doc: Any, name: str) -> str | None:
    return _field(doc, name, str) if isinstance(doc, dict) and name in doc else None
