"""The two envelopes' signing inputs and the grammar of their fields.

Telemetry (``docs/federation.md``)::

    input = timestamp "." nonce "." body          ; ASCII, then the raw body bytes

Feedback::

    input = tenant "|" signed_at "|" nonce "|" schema "|" kid "|" canonical_data   ; UTF-8

``timestamp`` and ``signed_at`` are Unix seconds as a decimal integer with no
sign and no leading zero; ``nonce`` is at least 16 bytes as canonical unpadded
base64url; ``schema`` and a peer's ``kid`` match ``[A-Za-z0-9._:-]{1,128}``;
``canonical_data`` is the RFC 8785 form of ``data`` (``_strict_json``). No field before ``canonical_data`` can hold
a ``|``, so a feedback input splits back one way only.

No byte string is an input of both flows: in a telemetry input the first byte
that is not an ASCII digit is ``.`` (the timestamp is one or more digits),
while in a feedback input it is a letter, ``_``, ``-`` (from the tenant) or
``|``, never ``.``.

A feedback envelope is the JSON object of exactly ``FEEDBACK_FIELDS``. This
module is the one copy of these rules: signerd's routes, the client, the CLI
and the gateway's producer all check envelopes with it.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from ..errors import InvalidRequest
from ._names import valid_part
from ._strict_json import parse_json

__all__ = [
    "ATTESTATION_MEMBER",
    "ATTESTATION_RE",
    "FEEDBACK_FIELDS",
    "MIN_NONCE_BYTES",
    "PEER_KID_RE",
    "attestation_of_body",
    "attestation_of_data",
    "check_attestation",
    "check_kid",
    "check_nonce",
    "check_schema",
    "check_tenant",
    "check_timestamp",
    "decimal_seconds",
    "feedback_input",
    "telemetry_input",
    "valid_peer_kid",
]

MIN_NONCE_BYTES = 16
ATTESTATION_MEMBER = "attestation_measurement_hash"
FEEDBACK_FIELDS = frozenset({"tenant", "signed_at", "nonce", "schema", "kid", "data", "signature"})

PEER_KID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a peer's kid (signerd's own are narrower)
ATTESTATION_RE = re.compile(r"sha256:[0-9a-f]{64}")
_TIMESTAMP = re.compile(r"0|[1-9][0-9]{0,11}")
_NONCE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_SCHEMA = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def decimal_seconds(value: object) -> int:
    """A timestamp as the envelopes carry it: whole Unix seconds as a decimal string (no sign,
    no leading zero); ValueError otherwise. The string and the integer map one to one."""
    if isinstance(value, str) and _TIMESTAMP.fullmatch(value):
        return int(value)
    raise ValueError("timestamp is not a decimal string of whole seconds")


def check_timestamp(value: Any, name: str = "timestamp") -> int:
    """A decimal string of whole Unix seconds (no sign, no leading zero); its value."""
    try:
        return decimal_seconds(value)
    except ValueError:
        raise InvalidRequest(f"field {name!r} must be Unix seconds as a decimal string") from None


def check_nonce(value: Any) -> str:
    """Canonical unpadded base64url of at least 16 bytes."""
    if not isinstance(value, str) or not _NONCE.fullmatch(value):
        raise InvalidRequest("field 'nonce' must be unpadded base64url of 16 to 96 bytes")
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("field 'nonce' is not base64url") from exc
    if len(raw) < MIN_NONCE_BYTES or base64.urlsafe_b64encode(raw).rstrip(b"=") != value.encode():
        raise InvalidRequest("field 'nonce' must be canonical unpadded base64url of >= 16 bytes")
    return value


def check_schema(value: Any, name: str = "schema") -> str:
    if not isinstance(value, str) or not _SCHEMA.fullmatch(value):
        raise InvalidRequest(f"field {name!r} must match [A-Za-z0-9._:-]{{1,128}}")
    return value


def check_tenant(value: Any) -> str:
    if not isinstance(value, str) or not valid_part(value):
        raise InvalidRequest("field 'tenant' must match [a-z0-9][a-z0-9_-]{0,62}")
    return value


def valid_peer_kid(kid: object) -> bool:
    return isinstance(kid, str) and PEER_KID_RE.fullmatch(kid) is not None


def check_kid(value: Any, name: str = "kid") -> str:
    """A peer's kid: ``[A-Za-z0-9._:-]{1,128}`` (so never a ``|``)."""
    if not isinstance(value, str) or not PEER_KID_RE.fullmatch(value):
        raise InvalidRequest(f"field {name!r} must match [A-Za-z0-9._:-]{{1,128}}")
    return value


def check_attestation(value: Any) -> str:
    if not isinstance(value, str) or not ATTESTATION_RE.fullmatch(value):
        raise InvalidRequest("field 'attestation' must be 'sha256:' and 64 lower-case hex digits")
    return value


def telemetry_input(timestamp: str, nonce: str, body: bytes) -> bytes:
    return f"{timestamp}.{nonce}.".encode("ascii") + body


def feedback_input(
    tenant: str, signed_at: str, nonce: str, schema: str, kid: str, canonical_data: bytes
) -> bytes:
    head = "|".join((tenant, signed_at, nonce, schema, kid))
    if "|" in kid:  # kids are validated earlier; this keeps the split unambiguous regardless
        raise InvalidRequest("kid must not contain '|'")
    return head.encode("utf-8") + b"|" + canonical_data


def attestation_of_body(body: bytes, *, max_depth: int) -> str | None:
    """The attestation member of a telemetry body that is a JSON object, else None."""
    try:
        value = parse_json(body, max_bytes=len(body), max_depth=max_depth)
    except Exception:  # any refusal: the body carries no attestation we can trust
        return None
    if isinstance(value, dict):
        member = value.get(ATTESTATION_MEMBER)
        return member if isinstance(member, str) else None
    return None


def attestation_of_data(data: Any) -> str | None:
    """The attestation member of feedback ``data`` that is an object, else None."""
    if isinstance(data, dict):
        member = data.get(ATTESTATION_MEMBER)
        return member if isinstance(member, str) else None
    return None
