"""The wire forms: strict request parsing and response bodies.

Request bodies are parsed strictly: duplicate keys, NaN/Infinity, numbers
outside the safe range, non-object bodies and unknown fields are errors, and
base64 must be canonical standard base64. Nothing that fails here reaches a
backend or a signing input, and no error message quotes what the caller sent:
messages name only the fields of our own schema.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from typing import Any

from ..backends import KeyInfo, KeyVersion
from ..errors import InvalidBase64, InvalidRequest, MalformedJson
from ._jwk import to_jwk, to_pem
from ._names import KeyName

MAX_SAFE_INT = 2**53 - 1
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedJson("duplicate member name in an object")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise MalformedJson(f"{name} is not allowed")


def _parse_int(text: str) -> int:
    value = int(text)
    if abs(value) > MAX_SAFE_INT:
        raise MalformedJson("integer outside the safe range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    if math.isinf(value) or math.isnan(value):
        raise MalformedJson("number out of range")
    return value


def loads_strict(raw: bytes) -> Any:
    """Parse JSON with no duplicate keys, no NaN/Infinity and no huge numbers."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJson("body is not UTF-8") from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
            parse_int=_parse_int,
            parse_float=_parse_float,
        )
    except MalformedJson:
        raise
    except (ValueError, RecursionError) as exc:
        raise MalformedJson() from exc


def parse_object(raw: bytes, allowed: set[str], required: set[str]) -> dict[str, Any]:
    body = loads_strict(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    if not body.keys() <= allowed:
        # never the caller's name: only the fields of our own schema
        raise InvalidRequest(
            "unknown field; allowed: " + ", ".join(sorted(allowed))
            if allowed
            else "unknown field; this request takes no fields"
        )
    missing = sorted(required - set(body))
    if missing:
        raise InvalidRequest(f"missing field {missing[0]!r}")
    return body


def field_str(body: Mapping[str, Any], name: str) -> str:
    value = body[name]
    if not isinstance(value, str):
        raise InvalidRequest(f"field {name!r} must be a string")
    return value


def field_bool(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidRequest(f"field {name!r} must be true or false")
    return value


def b64decode(body: Mapping[str, Any], name: str) -> bytes:
    """Decode a canonical standard-base64 field."""
    value = field_str(body, name)
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"field {name!r} is not valid standard base64") from exc
    if base64.b64encode(decoded).decode("ascii") != value:
        raise InvalidBase64(f"field {name!r} is not canonical standard base64")
    return decoded


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def request_id_from(header: str | None, fresh: str) -> str:
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return fresh


def version_json(v: KeyVersion) -> dict[str, Any]:
    return {"version": v.version, "kid": v.kid, "state": v.state.value, "created_at": v.created_at}


def key_json(info: KeyInfo) -> dict[str, Any]:
    active = info.active
    return {
        "key": str(info.key),
        "tenant": info.key.tenant,
        "name": info.key.name,
        "active_kid": active.kid if active else None,
        "versions": [version_json(v) for v in info.versions],
    }


def kid_json(key: KeyName, v: KeyVersion) -> dict[str, Any]:
    return {
        "kid": v.kid,
        "key": str(key),
        "version": v.version,
        "state": v.state.value,
        "jwk": to_jwk(v.kid, v.public_key),
        "pem": to_pem(v.public_key),
    }
