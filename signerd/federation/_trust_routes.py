"""The trusted peer keys' endpoints: add, list and retire, as admin changes.

Adding and retiring run as admin changes (intent record, ``Idempotency-Key``,
outcome: ``signerd.server``'s ``RequestContext.admin``) under the admin lock
(across workers, the workers' lock). A kid of one of this signerd's own keys
is never trusted as a peer key, and unless ``allow_shared_keys`` one public
key belongs to one tenant only, among peer keys and this signerd's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..authz import Operation
from ..errors import (
    BackendUnavailable,
    InvalidRequest,
    KeyExists,
    SharedPeerKey,
    UnknownKey,
    UnknownKid,
)
from ..server import AdminChange, Made, RequestContext, Response, json_response
from ..wire import DEFAULT_JWK_ALG, KeyName, b64url, check_tenant, parse_json, parse_kid
from ._settings import FederationSettings
from ._trust import PeerKey, TrustedKeys, jwk_public, valid_peer_kid

if TYPE_CHECKING:
    from ..keys._service import KeyService

__all__ = ["TrustRoutes", "own_kid", "peer_kid"]

AdminLock = Callable[[], contextlib.AbstractAsyncContextManager[None]]


class TrustRoutes:
    """``POST /v1/trusted-keys``, ``GET /v1/trusted-keys``, ``POST …/{tenant}/{kid}/retire``."""

    def __init__(
        self,
        keys: KeyService,
        settings: FederationSettings,
        trusted: TrustedKeys,
        admin: AdminLock,
        max_body_bytes: int,
    ) -> None:
        self.keys = keys
        self.settings = settings
        self.trusted = trusted
        self._admin = admin
        self.max_body_bytes = max_body_bytes
        self.jwk_alg = DEFAULT_JWK_ALG  # the "alg" of the JWKs it answers (``server.jwk_alg``)

    async def add(self, ctx: RequestContext) -> Response:
        fields = {"tenant", "kid", "jwk"}
        body = ctx.json(fields, fields, depth=3, max_bytes=self.max_body_bytes)
        tenant = check_tenant(body["tenant"])
        kid = peer_kid(body["kid"])
        public = jwk_public(body["jwk"], kid)
        ctx.notes.kid = kid
        ctx.authorize(Operation.TRUST, tenant, None)
        keys = self.keys
        own = own_kid(kid)
        if own is not None:
            try:
                await keys.describe(own)
            except UnknownKey:
                pass
            else:
                raise KeyExists("the kid names one of this signerd's own keys")
        if not self.settings.allow_shared_keys:  # checked again under the lock by trusted.add
            if self.trusted.tenants_of(public) - {tenant}:
                raise SharedPeerKey()
            if any(
                v.public_key == public and parse_kid(v.kid)[0].tenant != tenant
                for v in keys.published()
            ):
                raise SharedPeerKey(
                    "this public key is one of this signerd's keys of another tenant"
                )

        async def apply() -> Response:
            try:
                added = await asyncio.to_thread(self.trusted.add, tenant, kid, public)
            except OSError as exc:
                raise BackendUnavailable("the trusted key store cannot be written") from exc
            return json_response(added.to_json(self.jwk_alg), status=201)

        what = f"trust-add {tenant} {kid} {b64url(public)}"
        return await self._change(ctx, "trust-add", tenant, kid, what, apply)

    async def list(self, ctx: RequestContext) -> Response:
        tenant = ctx.request.query.get("tenant")
        if tenant is not None:
            check_tenant(tenant)
        ctx.authorize(Operation.LIST, tenant, None)
        keys = self.trusted.list(tenant)
        return json_response({"keys": [k.to_json(self.jwk_alg) for k in keys]})

    async def retire(self, ctx: RequestContext) -> Response:
        match = ctx.request.match_info
        tenant = check_tenant(match["tenant"])
        kid = peer_kid(match["kid"])
        raw = await ctx.request.read()
        if raw.strip() and parse_json(raw, max_bytes=64, max_depth=1) != {}:
            raise InvalidRequest("retire takes no fields")
        ctx.notes.kid = kid
        ctx.authorize(Operation.TRUST, tenant, None)

        async def apply() -> Response:
            try:
                retired = await asyncio.to_thread(self.trusted.retire, tenant, kid)
            except OSError as exc:
                raise BackendUnavailable("the trusted key store cannot be written") from exc
            return json_response(retired.to_json(self.jwk_alg))

        what = f"trust-retire {tenant} {kid}"
        return await self._change(ctx, "trust-retire", tenant, kid, what, apply)

    async def _change(
        self,
        ctx: RequestContext,
        kind: str,
        tenant: str,
        kid: str,
        what: str,
        apply: Callable[[], Awaitable[Response]],
    ) -> Response:
        """A trusted-key change: intent record, Idempotency-Key, outcome."""

        def find() -> PeerKey | None:
            return next((k for k in self.trusted.list(tenant) if k.kid == kid), None)

        async def before() -> str:
            found = await asyncio.to_thread(find)
            return "absent" if found is None else found.state

        async def made(kind: str, was: Any) -> Made | None:
            found = await asyncio.to_thread(find)
            now = "absent" if found is None else found.state
            if (
                found is None
                or now == was
                or now != ("active" if kind == "trust-add" else "retired")
            ):
                return None
            return json_response(
                found.to_json(self.jwk_alg), status=201 if kind == "trust-add" else 200
            ), kid

        change = AdminChange(kind, f"trust {tenant} {kid}", what, self._admin, apply, before, made)
        return await ctx.admin(change)


def peer_kid(value: Any) -> str:
    """A peer key's kid as the API takes it; InvalidRequest otherwise."""
    if not valid_peer_kid(value):
        raise InvalidRequest("field 'kid' must match [A-Za-z0-9._:-]{1,128}")
    assert isinstance(value, str)
    return value


def own_kid(kid: str) -> KeyName | None:
    """The key of this signerd's a kid names (by its form), or None."""
    try:
        return parse_kid(kid)[0]
    except UnknownKid:
        return None
