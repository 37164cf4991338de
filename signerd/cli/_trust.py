"""signerctl's caller and trust commands: who signerd thinks you are, and trusted peer keys.

::

    whoami                                        the peer credentials and matching rules
    trust list [--tenant T]
    trust add --tenant T --kid KID --jwk-file F   (F: an RFC 8037 OKP JWK; '-': stdin)
    trust remove KID [--tenant T]                 (retire: envelopes under KID are refused)

``trust remove`` finds the tenant from the trusted keys when ``--tenant`` is not
given and exactly one tenant trusts KID.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any

from ._io import Failure, plain, read_input, register, table

if TYPE_CHECKING:
    from ..client import Client, TrustedKey


def _fingerprint(jwk: dict[str, str]) -> str:
    """A JWK's RFC 7638 thumbprint (base64url SHA-256), "-" when it is not one of ours."""
    from ..wire import b64url_decode, thumbprint

    try:
        return thumbprint(b64url_decode(jwk.get("x", "")))
    except ValueError:
        return "-"


def _trusted_json(k: TrustedKey) -> dict[str, Any]:
    doc: dict[str, Any] = plain(k)
    doc["thumbprint"] = _fingerprint(k.jwk)
    return doc


def _trusted_table(keys: list[TrustedKey]) -> str:
    rows = [["TENANT", "KID", "STATE", "SOURCE", "THUMBPRINT (RFC 7638)"]]
    rows += [[k.tenant, k.kid, k.state, k.source, _fingerprint(k.jwk)] for k in keys]
    return table(rows)


def _whoami(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    doc = c.whoami()
    peer = doc["peer"]
    groups = ",".join(str(g) for g in peer.get("groups") or []) or "-"
    lines = [
        f"uid     {peer.get('uid')}" + (f" ({peer['user']})" if peer.get("user") else ""),
        f"gid     {peer.get('gid')}   groups {groups}",
        f"unit    {peer.get('unit') or '-'}",
        f"pid     {peer.get('pid')}",
        "",
    ]
    rules = doc["rules"]
    if not rules:
        lines.append("no policy rule matches this caller: every call but health is refused")
        return doc, "\n".join(lines)
    lines.append("matching rules, in the order the policy tries them:")
    rows = [["RULE", "TENANTS", "KEYS", "OPERATIONS", "RATE"]]
    for r in rules:
        tenants = "*" if r.get("tenants") is None else ",".join(r["tenants"])
        rate = "-" if r.get("rate") is None else f"{r['rate']:g}/s burst {r.get('burst')}"
        rows.append(
            [str(r.get("rule")), tenants, ",".join(r["keys"]), ",".join(r["operations"]), rate]
        )
    return doc, "\n".join(lines) + "\n" + table(rows)


def _trust_list(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    keys = c.trusted_keys(a.tenant)
    return {"keys": [_trusted_json(k) for k in keys]}, _trusted_table(keys) if keys else "no keys"


def _trust_add(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    from ..wire import loads_strict

    jwk = loads_strict(read_input(a.jwk_file))
    if not isinstance(jwk, dict) or not all(isinstance(v, str) for v in jwk.values()):
        raise Failure(os.EX_DATAERR, "invalid_jwk", f"{a.jwk_file}: not a JWK (a JSON object)")
    added = c.trust_key(a.tenant, a.kid, jwk)
    return _trusted_json(added), f"trusted: {added.kid}\n\n{_trusted_table([added])}"


def _trust_remove(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    tenant = a.tenant
    if tenant is None:
        tenants = sorted({k.tenant for k in c.trusted_keys() if k.kid == a.kid})
        if not tenants:
            raise Failure(os.EX_NOINPUT, "unknown_kid", f"kid {a.kid}: no tenant trusts it")
        if len(tenants) > 1:
            raise Failure(
                os.EX_USAGE,
                "ambiguous_tenant",
                f"kid {a.kid} is trusted by several tenants ({', '.join(tenants)}): give --tenant",
            )
        tenant = tenants[0]
    retired = c.retire_trusted_key(tenant, a.kid)
    return _trusted_json(retired), f"retired: {retired.kid}\n\n{_trusted_table([retired])}"


def add_commands(sub: Any) -> None:
    """Register ``whoami`` and ``trust list|add|remove`` on signerctl's sub-parsers."""
    register(sub, "whoami", _whoami, "the policy rules that match you, as signerd sees you")
    trust = sub.add_parser("trust", help="trusted peer keys (federation)")
    tsub = trust.add_subparsers(dest="trust_command", required=True, metavar="ACTION")
    register(tsub, "list", _trust_list, "list trusted peer keys").add_argument("--tenant")
    p = register(tsub, "add", _trust_add, "trust a peer's public key for a tenant")
    p.add_argument("--tenant", required=True)
    p.add_argument("--kid", required=True, help="the peer's kid")
    p.add_argument(
        "--jwk-file",
        metavar="FILE",
        required=True,
        help="the peer's public key, an RFC 8037 OKP JWK ('-': stdin)",
    )
    p = register(tsub, "remove", _trust_remove, "retire a trusted peer key")
    p.add_argument("kid", metavar="KID")
    p.add_argument("--tenant", help="the tenant that trusts it (default: the only one that does)")
    p.set_defaults(exit_for={"unknown_kid": os.EX_NOINPUT})
