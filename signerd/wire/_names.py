"""Key names and kids.

A key is named ``TENANT/NAME``; each part matches ``[a-z0-9][a-z0-9_-]{0,62}``.

A kid names one version of one key::

    kid     = tenant "." name ".v" version
    version = "1"-"9" *DIGIT        ; no leading zero, at most 9 digits

for example ``acme.feedback.v3``. ``.`` cannot occur in a tenant or a name, so
a kid splits back into exactly one (tenant, name, version). A kid uses only
``[a-z0-9_.-]``: it is safe in URLs, HTTP headers, file names and the
``|``-separated feedback signing input. Versions are never reused for a key,
so a kid is never reused, even after its version is destroyed.

Every check is a full match over ASCII: ``$`` would accept a final newline
(``acme/feedback\n``) and ``str.isdigit`` would accept superscript,
Arabic-Indic and fullwidth digits, so neither is used.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from ..errors import InvalidKeyName, UnknownKid, UnknownVersion

_PART = r"[a-z0-9][a-z0-9_-]{0,62}"
_VERSION = r"[1-9][0-9]{0,8}"
_PART_RE = re.compile(_PART)
_KID_RE = re.compile(rf"({_PART})\.({_PART})\.v({_VERSION})")
_VERSION_RE = re.compile(_VERSION)
MAX_VERSION = 999_999_999


class VersionState(enum.StrEnum):
    """The state of one version of a key, as the wire names it."""

    PENDING = "pending"  # published for verifiers, not signing yet
    ACTIVE = "active"  # the one version that signs (exactly one per key)
    VERIFY_ONLY = "verify-only"  # verifies, no longer signs
    RETIRED = "retired"  # kid known, verify refused, material still held
    PENDING_DELETION = "pending_deletion"  # retired, destroyed by the daemon at deletion_at
    DESTROYED = "destroyed"  # material gone, kid still known


@dataclass(frozen=True, order=True)
class KeyName:
    tenant: str
    name: str

    @classmethod
    def parse(cls, text: object) -> KeyName:
        """Parse ``TENANT/NAME``; raise InvalidKeyName otherwise."""
        if not isinstance(text, str):
            raise InvalidKeyName()
        known = _PARSED.get(text)
        if known is not None and cls is KeyName:
            return known
        tenant, sep, name = text.partition("/")
        if not sep:
            raise InvalidKeyName()
        key = cls.of(tenant, name)
        if cls is KeyName:
            if len(_PARSED) >= _MAX_PARSED:
                _PARSED.clear()
            _PARSED[text] = key
        return key

    @classmethod
    def of(cls, tenant: str, name: str) -> KeyName:
        if not valid_part(tenant) or not valid_part(name):
            raise InvalidKeyName()
        return cls(tenant, name)

    def kid(self, version: int) -> str:
        if not 1 <= version <= MAX_VERSION:
            raise ValueError(f"version out of range: {version}")
        return f"{self.tenant}.{self.name}.v{version}"

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"


_PARSED: dict[str, KeyName] = {}  # names parsed lately (a sign request parses one)
_MAX_PARSED = 4096


def valid_part(text: object) -> bool:
    """Whether ``text`` is a whole tenant or name part (ASCII, no final newline)."""
    return isinstance(text, str) and _PART_RE.fullmatch(text) is not None


def parse_version(text: object) -> int:
    """A version number from a path: ASCII digits, no leading zero; else UnknownVersion."""
    if not isinstance(text, str) or _VERSION_RE.fullmatch(text) is None:
        raise UnknownVersion()
    return int(text)


def parse_kid(kid: object) -> tuple[KeyName, int]:
    """Split a kid into its key and version; raise UnknownKid when it is malformed."""
    if not isinstance(kid, str):
        raise UnknownKid()
    match = _KID_RE.fullmatch(kid)
    if match is None:
        raise UnknownKid()
    return KeyName(match.group(1), match.group(2)), int(match.group(3))
