"""mTLS for a gateway: TLS contexts, and service identities pinned to certificate fingerprints.

The seeds' handshake flow: the client certificate is required (the TLS
handshake itself fails without one, ``ssl.CERT_REQUIRED``), the caller
declares its service identity in a header, and the SHA-256 of the DER of the
certificate it presented must be one of the fingerprints pinned for that
identity. A certificate the CA signed but that is pinned to another identity
(or to none) is refused: the CA says who may connect, the pins say who is who.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._status import Refusal

_IDENTITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")


_NOT_PINNED = "client certificate is not pinned for the declared service identity"


def _refused(message: str = _NOT_PINNED) -> Refusal:
    """The gateway's own 401 (not a signerd wire code), sent before the body is read."""
    return Refusal(401, "invalid_client_certificate", message)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate as 64 lower-case hex digits."""
    return hashlib.sha256(der).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Accept ``AB:CD:...``, ``sha256:abcd...`` or plain hex; raise ValueError otherwise."""
    value = text.lower()
    value = value.removeprefix("sha256:").replace(":", "")
    if not _FINGERPRINT_RE.fullmatch(value):
        raise ValueError("a certificate fingerprint is 64 hex digits (SHA-256 of the DER)")
    return value


@dataclass(frozen=True)
class ServicePins:
    """Which certificate fingerprints each service identity may present.

    ``pins`` maps an identity (``[A-Za-z0-9][A-Za-z0-9._:-]{0,127}``) to its
    allowed fingerprints; several allow a certificate rotation without a gap.
    ``header`` is where the caller declares its identity.
    """

    pins: Mapping[str, frozenset[str]]
    header: str = "X-Service-Identity"
    _table: dict[str, frozenset[str]] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_mapping(
        cls, pins: Mapping[str, Iterable[str]], *, header: str = "X-Service-Identity"
    ) -> ServicePins:
        """Validate and normalise a configuration mapping (ValueError names the bad entry)."""
        table: dict[str, frozenset[str]] = {}
        for identity, prints in pins.items():
            if not _IDENTITY_RE.fullmatch(identity):
                raise ValueError(f"service identity {identity!r}: not a valid identity")
            if isinstance(prints, str):
                raise ValueError(f"service identity {identity!r}: give a list of fingerprints")
            try:
                table[identity] = frozenset(normalise_fingerprint(p) for p in prints)
            except ValueError as exc:
                raise ValueError(f"service identity {identity!r}: {exc}") from None
        return cls(table, header)

    def check(self, declared: str | None, ssl_object: Any) -> str:
        """The identity, when the TLS peer's certificate is pinned for it; Refusal (401) otherwise."""
        if declared is None or not _IDENTITY_RE.fullmatch(declared):
            raise _refused("missing or malformed service identity")
        allowed = self.pins.get(declared)
        if not allowed:
            raise _refused()
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            raise _refused("the connection is not TLS")
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            raise _refused("no client certificate")
        if fingerprint(der) not in allowed:
            raise _refused()
        return declared


def server_context(
    certfile: str, keyfile: str, client_ca: str, *, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(certfile, keyfile)
    ctx.load_verify_locations(cafile=client_ca)
    return ctx


def client_context(
    server_ca: str, certfile: str, keyfile: str, *, minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
) -> ssl.SSLContext:
    """A client context that checks the server against ``server_ca`` and presents a certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server_ca)
    ctx.minimum_version = minimum
    ctx.load_cert_chain(certfile, keyfile)
    return ctx
