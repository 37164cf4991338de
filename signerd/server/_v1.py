"""The v1 routes and their handlers, on top of the key service.

Connections and parsing are ``_connection``'s; what every request passes
through (request id, peer, refusal before the body, error envelope, audit
record) is ``_dispatch``'s. Handlers are ``async def x(self, ctx) ->
Response``: they read, authorize and note what the audit record says
through the ``RequestContext`` (``_context``).
"""

from __future__ import annotations

import asyncio
import importlib.resources
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..audit import AuditSink
from ..authz import Call, Operation
from ..backends import KeyVersion
from ..errors import (
    InvalidRequest,
    PermissionDenied,
    RateLimited,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ..keys import KeyService
from ..wire import (
    DEFAULT_JWK_ALG,
    KeyName,
    b64decode,
    b64encode,
    field_bool,
    field_str,
    parse_kid,
    parse_version,
)
from ._batchnotes import note_batch as _note_batch
from ._context import AdminChange, RequestContext
from ._context import sha256_hex as _sha256
from ._dispatch import Front, PeerLookup, VisibilityGate
from ._limits import Limits
from ._lookups import Lookups, described
from ._request import Response, json_response

if TYPE_CHECKING:
    from ..keys._service import KeyService

__all__ = ["ROUTES", "Server"]


def _item_error(exc: SignerdError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


_GROUP_MAX_BYTES = 16384  # payloads up to this size are signed in groups
_VERSION = "/v1/keys/{tenant}/{name}/versions/{version}"
#: (method, path, handler method name, operation): the v1 routes, also checked against
#: openapi.json. ``Operation.HEALTH`` routes are open (no grant, no audit record).
ROUTES: tuple[tuple[str, str, str, Operation], ...] = (
    ("GET", "/v1/health", "health", Operation.HEALTH),
    ("GET", "/v1/ready", "ready", Operation.HEALTH),
    ("GET", "/v1/openapi.json", "openapi", Operation.HEALTH),
    ("POST", "/v1/keys", "create_key", Operation.CREATE),
    ("GET", "/v1/keys", "list_keys", Operation.LIST),
    ("GET", "/v1/keys/{tenant}/{name}", "get_key", Operation.LIST),
    ("POST", "/v1/keys/{tenant}/{name}/rotate", "rotate", Operation.ROTATE),
    ("POST", f"{_VERSION}/promote", "promote", Operation.PROMOTE),
    ("POST", f"{_VERSION}/retire", "retire", Operation.RETIRE),
    ("POST", f"{_VERSION}/destroy", "destroy", Operation.DESTROY),
    ("POST", f"{_VERSION}/cancel-deletion", "cancel_deletion", Operation.DESTROY),
    ("POST", "/v1/sign", "sign", Operation.SIGN),
    ("POST", "/v1/verify", "verify", Operation.VERIFY),
    ("GET", "/v1/jwks", "jwks", Operation.JWKS),
    ("GET", "/v1/kids/{kid}", "kid", Operation.JWKS),
    ("GET", "/v1/whoami", "whoami", Operation.HEALTH),
)


class Server(Front, Lookups):
    """The v1 handlers on top of the key service (``Front`` routes, refuses and audits)."""

    def __init__(
        self,
        keys: KeyService,
        *,
        gate: VisibilityGate,
        audit: AuditSink,
        peer_lookup: PeerLookup,
        limits: Limits | None = None,
        jwk_alg: str = DEFAULT_JWK_ALG,
    ) -> None:
        super().__init__(gate=gate, audit=audit, peer_lookup=peer_lookup, limits=limits)
        self.keys, self.jwk_alg = keys, jwk_alg  # jwk_alg: Ed25519 (RFC 9864) or EdDSA
        self._openapi = importlib.resources.files("signerd").joinpath("openapi.json").read_bytes()
        self.add_routes((m, p, getattr(self, name), op) for m, p, name, op in ROUTES)

    # --- health ---------------------------------------------------------------

    async def health(self, ctx: RequestContext) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, ctx: RequestContext) -> Response:
        """Readiness, answered for anyone (the key service shares one check a second)."""
        await self.keys.ready()
        return json_response({"status": "ready"})

    async def openapi(self, ctx: RequestContext) -> Response:
        return Response(body=self._openapi)

    # --- keys -----------------------------------------------------------------

    async def create_key(self, ctx: RequestContext) -> Response:
        body = ctx.json({"key"}, {"key"})
        key = KeyName.parse(body["key"])
        ctx.authorize(Operation.CREATE, key.tenant, key)

        async def apply() -> Response:
            info = await self.keys.create(key)
            ctx.notes.kid = info.versions[-1].kid
            return json_response(described(self.keys, info), status=201)

        return await self._change(ctx, "create", key, f"create {key}", apply)

    async def list_keys(self, ctx: RequestContext) -> Response:
        tenant = ctx.request.query.get("tenant")
        if tenant is not None:
            KeyName.of(tenant, "x")  # validates the tenant part
        ctx.authorize(Operation.LIST, tenant, None)
        peer = ctx.peer
        infos = [
            i
            for i in await self.keys.list_keys(tenant)
            if self.gate.visible(peer, Operation.LIST, i.key)
        ]
        return json_response({"keys": [described(self.keys, i) for i in infos]})

    async def get_key(self, ctx: RequestContext) -> Response:
        key = _path_key(ctx)
        ctx.authorize(Operation.LIST, key.tenant, key)
        return json_response(described(self.keys, await self.keys.describe(key)))

    async def rotate(self, ctx: RequestContext) -> Response:
        key = _path_key(ctx)
        body = ctx.json({"pending"}, set())
        pending = field_bool(body, "pending", False)
        ctx.authorize(Operation.ROTATE, key.tenant, key)

        async def apply() -> Response:
            info, new = await self.keys.rotate(key, pending=pending)
            ctx.notes.kid = new.kid
            return json_response({"kid": new.kid, "key": described(self.keys, info)})

        return await self._change(ctx, "rotate", key, f"rotate {key} {pending}", apply)

    async def promote(self, ctx: RequestContext) -> Response:
        key, version, _ = await self._version_request(ctx, Operation.PROMOTE, set())
        return await self._version_change(
            ctx, "promote", key, version, None, lambda: self.keys.promote(key, version)
        )

    async def retire(self, ctx: RequestContext) -> Response:
        key, version, _ = await self._version_request(ctx, Operation.RETIRE, set())
        return await self._version_change(
            ctx, "retire", key, version, None, lambda: self.keys.retire(key, version)
        )

    async def destroy(self, ctx: RequestContext) -> Response:
        """Schedule a retired version's deletion (audited as ``schedule-deletion``); with
        ``"now": true`` and the kid as ``confirm``, destroy it at once."""
        key, version, body = await self._version_request(ctx, Operation.DESTROY, {"confirm", "now"})
        confirm = field_str(body, "confirm") if "confirm" in body else None
        now = field_bool(body, "now", False)
        kind = "destroy" if now else "schedule-deletion"
        ctx.notes.action = kind
        return await self._version_change(
            ctx,
            kind,
            key,
            version,
            confirm,
            lambda: self.keys.destroy(key, version, confirm, now=now),
        )

    async def cancel_deletion(self, ctx: RequestContext) -> Response:
        """Put a version pending deletion back to retired (granted as ``destroy``)."""
        key, version, _ = await self._version_request(ctx, Operation.DESTROY, set())
        ctx.notes.action = "cancel-deletion"
        return await self._version_change(
            ctx,
            "cancel-deletion",
            key,
            version,
            None,
            lambda: self.keys.cancel_deletion(key, version),
        )

    async def _version_request(
        self, ctx: RequestContext, op: Operation, allowed: set[str]
    ) -> tuple[KeyName, int, dict[str, Any]]:
        key = _path_key(ctx)
        version = parse_version(ctx.request.match_info["version"])
        body = ctx.json(allowed, set())
        ctx.authorize(op, key.tenant, key)
        ctx.notes.kid = key.kid(version)
        return key, version, body

    async def _version_change(
        self,
        ctx: RequestContext,
        kind: str,
        key: KeyName,
        version: int,
        confirm: str | None,
        change: Callable[[], Awaitable[Any]],
    ) -> Response:
        async def apply() -> Response:
            return json_response(described(self.keys, await change()))

        what = f"{kind} {key} {version} {confirm}"
        return await self._change(ctx, kind, key, what, apply, version)

    # --- what an admin change needs to be said exactly (``_idempotency``) -----------

    async def _change(
        self,
        ctx: RequestContext,
        kind: str,
        key: KeyName,
        what: str,
        apply: Callable[[], Awaitable[Response]],
        version: int = 0,
    ) -> Response:
        change = AdminChange(
            kind=kind,
            target=f"key {key}",
            what=what,
            lock=lambda: self.keys.admin(key),
            apply=apply,
            before=lambda: self._before(key, kind, version),
            made=lambda kind, before: self._made(key, kind, before),
        )
        return await ctx.admin(change)

    async def _before(self, key: KeyName, kind: str, version: int) -> dict[str, Any]:
        """What the change will alter: whether the key exists, its last version, a state."""
        if kind == "create":
            return {"exists": await self.keys.read(key) is not None}
        info = await self.keys.describe(key)
        if kind == "rotate":
            return {"last": max(v.version for v in info.versions)}
        found = info.version(version)
        if found is None:
            raise UnknownVersion()
        return {"version": version, "state": found.state.value}

    async def _made(
        self, key: KeyName, kind: str, before: dict[str, Any]
    ) -> tuple[Response, str | None] | None:
        """The answer of a change of ``key`` found made (read from the backend now), or None."""
        try:
            now = await self.keys.describe(key)
        except UnknownKey:
            return None
        if kind == "create":
            if before["exists"]:
                return None
            return json_response(described(self.keys, now), status=201), now.versions[0].kid
        if kind == "rotate":
            new = sorted((v for v in now.versions if v.version > before["last"]), key=_number)
            if not new:
                return None
            return json_response({"kid": new[0].kid, "key": described(self.keys, now)}), new[0].kid
        found = now.version(before["version"])
        if (found.state.value if found is not None else "absent") == before["state"]:
            return None
        return json_response(described(self.keys, now)), key.kid(before["version"])

    # --- sign and verify --------------------------------------------------------

    async def sign(self, ctx: RequestContext) -> Response:
        body = ctx.json({"key", "data", "items"}, set())
        if "items" in body:
            if "key" in body or "data" in body:
                raise InvalidRequest("use either key and data, or items")
            return await self._sign_batch(ctx, body["items"])
        if "key" not in body or "data" not in body:
            raise InvalidRequest("missing field 'key' or 'data'")
        key = KeyName.parse(body["key"])
        data = b64decode(body, "data")
        notes = ctx.notes
        notes.hashes = (_sha256(data),)
        ctx.authorize(Operation.SIGN, key.tenant, key)
        # the signs read in one loop turn go to the token as a group, unless they are large
        # (grouping many holds their payloads at once; a large one gains nothing by it)
        ctx.group = self.answering > 1 and len(data) <= _GROUP_MAX_BYTES
        kid, signature = await self.keys.sign(key, data, ctx.sign_intent, ctx.group)
        notes.kid = kid
        await ctx.durable()  # the intent records: written while the token signed
        return json_response({"kid": kid, "signature": b64encode(signature)})

    async def _sign_batch(self, ctx: RequestContext, items: Any) -> Response:
        if not isinstance(items, list) or not items:
            raise InvalidRequest("items must be a non-empty list")
        if len(items) > self.limits.max_batch_items:
            raise InvalidRequest(f"at most {self.limits.max_batch_items} items per batch")
        parsed: list[tuple[KeyName, bytes]] = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"key", "data"}:
                raise InvalidRequest("each item must be an object with exactly key and data")
            parsed.append((KeyName.parse(item["key"]), b64decode(item, "data")))
        audit = ctx.notes
        peer = ctx.peer
        results: list[dict[str, Any]] = [{} for _ in parsed]
        by_key: dict[KeyName, list[int]] = {}
        for i, (key, _) in enumerate(parsed):  # refused items are answered per item
            try:
                self.gate.authorize(Call(peer, Operation.SIGN, key.tenant, key))
            except SignerdError as exc:
                results[i] = _item_error(exc)
                continue
            by_key.setdefault(key, []).append(i)

        async def one_key(key: KeyName, at: list[int]) -> None:
            try:
                kid, signed = await self.keys.sign_many(key, [parsed[i][1] for i in at])
            except SignerdError as exc:
                for i in at:
                    results[i] = _item_error(exc)
                return
            for i, sig in zip(at, signed, strict=True):
                if isinstance(sig, SignerdError):
                    results[i] = _item_error(sig)
                else:
                    results[i] = {"kid": kid, "signature": b64encode(sig)}

        await asyncio.gather(*(one_key(k, at) for k, at in by_key.items()))
        summary = _note_batch(audit, parsed, results)
        if summary is not None:
            codes = {r["error"]["code"] for r in results if "error" in r}
            if not audit.hashes and codes <= {PermissionDenied.code, RateLimited.code}:
                # nothing was granted: refused as a whole (a refusal, or over the rate)
                if codes == {PermissionDenied.code}:
                    raise PermissionDenied(f"every item was refused: {summary}")
                raise RateLimited(f"every item was refused: {summary}")
            ctx.reason = summary
        return json_response({"results": results})

    async def verify(self, ctx: RequestContext) -> Response:
        body = ctx.json({"kid", "data", "signature"}, {"kid", "data", "signature"})
        kid = field_str(body, "kid")
        data = b64decode(body, "data")
        signature = b64decode(body, "signature")
        ctx.notes.hashes, ctx.notes.kid = (_sha256(data),), kid
        key, _ = parse_kid(kid)
        ctx.authorize(Operation.VERIFY, key.tenant, key)
        key, version = await self.keys.verify(kid, data, signature)
        return json_response({"kid": kid, "key": str(key), "state": version.state.value})


def _path_key(ctx: RequestContext) -> KeyName:
    match = ctx.request.match_info
    return KeyName.of(match["tenant"], match["name"])


def _number(version: KeyVersion) -> int:
    return version.version
