"""The v1 lookups: public keys (``/v1/jwks``, ``/v1/kids/{kid}``) and the caller's own
grants (``/v1/whoami``).

A kid that signerd does not know is ``unknown_kid`` with status 404 here (the resource
does not exist); in a verification it stays 401, the refusal of a signature.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..authz import Operation, Peer, Policy
from ..backends import KeyInfo, Locator
from ..errors import UnknownKid
from ..keys import rotation_due
from ..wire import KeyName, key_json, kid_json, parse_kid, to_jwk
from ._request import Response, json_response

if TYPE_CHECKING:
    from ..keys import KeyService
    from ._context import RequestContext
    from ._dispatch import VisibilityGate

__all__ = ["KidNotFound", "Lookups", "described"]


class KidNotFound(UnknownKid):
    """``unknown_kid`` answered to a lookup of the kid: 404, not a verification's 401."""

    status = 404


class Lookups:
    """The lookup handlers of ``Server`` (which provides ``keys`` and ``gate``)."""

    keys: KeyService
    gate: VisibilityGate
    jwk_alg: str  # Ed25519 (RFC 9864) or EdDSA

    async def jwks(self, ctx: RequestContext) -> Response:
        tenant = ctx.request.query.get("tenant")
        if tenant is not None:
            KeyName.of(tenant, "x")
        ctx.authorize(Operation.JWKS, tenant, None)
        peer = ctx.peer
        keys = [
            to_jwk(v.kid, v.public_key, self.jwk_alg)
            for v in self.keys.published(tenant)
            if self.gate.visible(peer, Operation.JWKS, parse_kid(v.kid)[0])
        ]
        return json_response({"keys": keys}, headers={"Cache-Control": "max-age=60"})

    async def kid(self, ctx: RequestContext) -> Response:
        kid = ctx.request.match_info["kid"]
        try:
            key, _ = parse_kid(kid)
        except UnknownKid:
            raise KidNotFound() from None
        ctx.notes.kid = kid
        ctx.authorize(Operation.JWKS, key.tenant, key)
        try:
            key, version = await self.keys.lookup_kid(kid)
        except KidNotFound:
            raise
        except UnknownKid as exc:
            raise KidNotFound(exc.message) from None
        return json_response(kid_json(key, version, self.jwk_alg))

    async def whoami(self, ctx: RequestContext) -> Response:
        """The caller as the kernel reports it, and the policy rules that match it (in the
        order the policy tries them: the first that grants a call decides it)."""
        peer = ctx.peer
        gate = self.gate
        rules = [
            _rule_json(r)
            for r in (gate.rules if isinstance(gate, Policy) else ())
            if r.matches(peer)
        ]
        return json_response({"peer": _peer_json(peer), "rules": rules})


def described(keys: KeyService, info: KeyInfo) -> dict[str, Any]:
    """A key's description with where it lives: its algorithm, the name of its backend, the
    seconds a destroy would wait (``keys.deletion_wait``), when its rotation is due (``keys.max_active_age``; null when no rule names it or it has no
    active version), and for a backend whose objects other tools can find, each version's
    RFC 7512 URI."""
    doc = key_json(info)
    name, backend = keys.backend_of(info.key)
    doc["algorithm"] = "Ed25519"
    doc["backend"] = name
    due = rotation_due(keys.settings, info, time.time())
    doc["deletion_wait"] = keys.settings.deletion_wait  # what a destroy would wait now
    doc["rotation_due"] = (
        None
        if due is None
        else {"max_active_age": due.max_age, "at": int(due.at), "overdue": due.overdue}
    )
    if isinstance(backend, Locator):
        for v in doc["versions"]:
            v["pkcs11_uri"] = backend.object_uri(v["kid"])
    return doc


def _peer_json(peer: Peer) -> dict[str, Any]:
    return {
        "uid": peer.uid,
        "gid": peer.gid,
        "pid": peer.pid,
        "user": peer.user,
        "unit": peer.unit,
        "groups": list(peer.groups),
    }


def _rule_json(rule: Any) -> dict[str, Any]:
    return {
        "rule": rule.label,
        "tenants": None if rule.tenants is None else sorted(rule.tenants),
        "keys": list(rule.keys),
        "operations": sorted(op.value for op in rule.operations),
        "rate": rule.rate,
        "burst": rule.burst if rule.rate is not None else None,
    }
