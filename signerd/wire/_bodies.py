"""Request and response bodies of the v1 API.

Request bodies are parsed strictly (``loads_strict``: the rules of
``_strict_json``); non-object bodies and unknown fields are errors, and base64
must be canonical standard base64. Nothing that fails here reaches a backend
or a signing input, and no error message quotes what the caller sent:
messages name only the fields of our own schema.

The response helpers take any value with the attributes of the backends'
``KeyVersion``/``KeyInfo`` (the protocols below), so the wire contract does not
depend on the backends.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Protocol

from ..errors import InvalidBase64, InvalidRequest
from ._jwk import DEFAULT_JWK_ALG, thumbprint, to_jwk, to_pem
from ._names import KeyName
from ._strict_json import loads_strict

_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")


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
    if required and not required <= body.keys():
        missing = sorted(required - set(body))
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
        # strict: the alphabet only, padding only at the end (``b64decode(validate=True)``)
        decoded = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidBase64(f"field {name!r} is not valid standard base64") from exc
    if binascii.b2a_base64(decoded, newline=False) != value.encode("ascii"):
        raise InvalidBase64(f"field {name!r} is not canonical standard base64")
    return decoded


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def request_id_from(header: str | None, fresh: str) -> str:
    if header and _REQUEST_ID_RE.fullmatch(header):
        return header
    return fresh


class Version(Protocol):
    """What a response says about one key version."""

    @property
    def version(self) -> int: ...
    @property
    def kid(self) -> str: ...
    @property
    def state(self) -> Enum: ...
    @property
    def public_key(self) -> bytes: ...
    @property
    def created_at(self) -> int: ...
    @property
    def state_changed_at(self) -> int | None: ...
    @property
    def deletion_at(self) -> int | None: ...


class Key(Protocol):
    """What a response says about one key."""

    @property
    def key(self) -> KeyName: ...
    @property
    def versions(self) -> Sequence[Version]: ...
    @property
    def active(self) -> Version | None: ...


def version_json(v: Version) -> dict[str, Any]:
    """A version; ``thumbprint``: its public key's RFC 7638 JWK thumbprint."""
    return {
        "version": v.version,
        "kid": v.kid,
        "state": v.state.value,
        "created_at": v.created_at,
        "state_changed_at": v.state_changed_at,
        "deletion_at": v.deletion_at,
        "thumbprint": thumbprint(v.public_key),
    }


def key_json(info: Key) -> dict[str, Any]:
    active = info.active
    return {
        "key": str(info.key),
        "tenant": info.key.tenant,
        "name": info.key.name,
        "active_kid": active.kid if active else None,
        "versions": [version_json(v) for v in info.versions],
    }


def kid_json(key: KeyName, v: Version, alg: str = DEFAULT_JWK_ALG) -> dict[str, Any]:
    return {
        "kid": v.kid,
        "key": str(key),
        "version": v.version,
        "state": v.state.value,
        "jwk": to_jwk(v.kid, v.public_key, alg),
        "pem": to_pem(v.public_key),
    }
