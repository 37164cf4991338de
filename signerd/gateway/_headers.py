"""The telemetry envelope in HTTP headers: which headers, and how they are read.

A producer sends its body as is and the envelope beside it::

    X-Signerd-Tenant: acme
    X-Signerd-Kid: acme.telemetry.v1
    X-Signerd-Timestamp: 1795000000
    X-Signerd-Nonce: 3q2-7wX9...            (unpadded base64url, >= 16 bytes)
    X-Signerd-Signature: MEUCIQ...==        (standard base64, 64 bytes)

Every value is bounded and checked against its pattern before anything is
sent to signerd; a missing or malformed one refuses the request (401, since
it is not authenticated) and is never echoed back.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import MultiMapping

_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KID_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TIMESTAMP_RE = re.compile(r"0|[1-9][0-9]{0,11}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22,128}")
_SIGNATURE_RE = re.compile(r"[A-Za-z0-9+/]{86}==")


class MalformedEnvelope(ValueError):
    """A telemetry header is missing or malformed; the message names the header only."""


@dataclass(frozen=True)
class TelemetryHeaders:
    """The header names that carry the telemetry envelope (configurable per deployment)."""

    tenant: str = "X-Signerd-Tenant"
    kid: str = "X-Signerd-Kid"
    timestamp: str = "X-Signerd-Timestamp"
    nonce: str = "X-Signerd-Nonce"
    signature: str = "X-Signerd-Signature"


@dataclass(frozen=True)
class TelemetryEnvelope:
    """The envelope of one telemetry request, each field checked against its pattern."""

    tenant: str
    kid: str
    timestamp: int
    nonce: str
    signature: bytes

    def as_headers(self, names: TelemetryHeaders) -> dict[str, str]:
        return {
            names.tenant: self.tenant,
            names.kid: self.kid,
            names.timestamp: str(self.timestamp),
            names.nonce: self.nonce,
            names.signature: base64.b64encode(self.signature).decode("ascii"),
        }


def single(headers: Mapping[str, str], name: str) -> str | None:
    """The header's one value; None when absent. Sent twice, it is ambiguous: MalformedEnvelope."""
    if isinstance(headers, MultiMapping) and len(headers.getall(name, ())) > 1:
        raise MalformedEnvelope(f"header {name} is repeated")
    return headers.get(name)


def _one(headers: Mapping[str, str], name: str, pattern: re.Pattern[str]) -> str:
    value = single(headers, name)
    if value is None:
        raise MalformedEnvelope(f"header {name} is missing")
    if not pattern.fullmatch(value):
        raise MalformedEnvelope(f"header {name} is malformed")
    return value


def read_envelope(headers: Mapping[str, str], names: TelemetryHeaders) -> TelemetryEnvelope:
    """The envelope from request headers; MalformedEnvelope names the first bad header."""
    tenant = _one(headers, names.tenant, _TENANT_RE)
    kid = _one(headers, names.kid, _KID_RE)
    timestamp = int(_one(headers, names.timestamp, _TIMESTAMP_RE))
    nonce = _one(headers, names.nonce, _NONCE_RE)
    encoded = _one(headers, names.signature, _SIGNATURE_RE)
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEnvelope(f"header {names.signature} is malformed") from None
    if base64.b64encode(signature).decode("ascii") != encoded:
        raise MalformedEnvelope(f"header {names.signature} is malformed")
    return TelemetryEnvelope(tenant, kid, timestamp, nonce, signature)
