"""Which token to use and how to log in: the ``[backends.NAME]`` table of type ``pkcs11``.

Parsing contacts nothing: it checks the table's keys and that the library file
exists, so ``signerd --check`` can validate a configuration offline.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_KNOWN = frozenset({"type", "module", "token_label", "token_serial", "uri", "pin_file"})


@dataclass(frozen=True)
class TokenConfig:
    module: str
    pin_file: str
    token_label: str | None = None
    token_serial: str | None = None


def parse_uri(uri: str) -> dict[str, str]:
    """The path attributes of an RFC 7512 ``pkcs11:`` URI we use (token, serial, module-path)."""
    if not uri.startswith("pkcs11:"):
        raise ValueError("uri: must start with 'pkcs11:'")
    body = uri[len("pkcs11:") :]
    path, _, query = body.partition("?")
    out: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"uri: attribute {name!r} has no value")
        out[name] = urllib.parse.unquote(value)
    if "pin-value" in out:
        raise ValueError("uri: pin-value is not accepted; use pin_file")
    return out


def parse_settings(cfg: Mapping[str, Any]) -> TokenConfig:
    """Validate the backend's configuration table; ValueError names the bad key."""
    for key in cfg:
        if key not in _KNOWN:
            raise ValueError(f"{key}: unknown key (known: {', '.join(sorted(_KNOWN))})")
    fields: dict[str, str] = {}
    if "uri" in cfg:
        attrs = parse_uri(str(cfg["uri"]))
        if "token" in attrs:
            fields["token_label"] = attrs["token"]
        if "serial" in attrs:
            fields["token_serial"] = attrs["serial"]
        if "module-path" in attrs:
            fields["module"] = attrs["module-path"]
    for key in ("module", "token_label", "token_serial", "pin_file"):
        if key in cfg:
            if not isinstance(cfg[key], str) or not cfg[key]:
                raise ValueError(f"{key}: must be a non-empty string")
            fields[key] = cfg[key]
    if "module" not in fields:
        raise ValueError("module: required (path to the PKCS#11 library), or module-path in uri")
    if "pin_file" not in fields:
        raise ValueError("pin_file: required (a file holding the user PIN)")
    if "token_label" not in fields and "token_serial" not in fields:
        raise ValueError("token_label: required (or token_serial, or token= in uri)")
    if not os.path.exists(fields["module"]):
        raise ValueError(f"module: no such file: {fields['module']}")
    return TokenConfig(**fields)


def object_uri(config: TokenConfig, kid: str) -> str:
    """The RFC 7512 URI of the private key object of ``kid`` on the configured token: the
    token (label or serial), the object's label and its CKA_ID (the kid's bytes), its type."""

    def pct(text: str) -> str:
        return urllib.parse.quote(text, safe="")

    path = []
    if config.token_label is not None:
        path.append(f"token={pct(config.token_label)}")
    if config.token_serial is not None:
        path.append(f"serial={pct(config.token_serial)}")
    ident = "".join(f"%{b:02x}" for b in kid.encode("ascii"))
    path += [f"id={ident}", f"object={pct(kid)}", "type=private"]
    return "pkcs11:" + ";".join(path)
