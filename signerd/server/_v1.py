"""The v1 routes and their handlers, on top of the key service.

Connections and parsing are ``_protocol``'s; what every request passes
through (request id, peer, refusal before the body, error envelope, audit
record) is ``_front``'s. Handlers are ``async def x(self, request) ->
Response`` and use only the small ``Request`` of ``_request``.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import re
from collections.abc import Awaitable, Callable
from typing import Any

from ..audit import AuditSink
from ..authz import Call, Operation
from ..backends import KeyVersion
from ..errors import (
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RateLimited,
    SignerdError,
    UnknownKey,
    UnknownVersion,
    UnsupportedMediaType,
)
from ..keys import KeyService
from ..wire import (
    KeyName,
    b64decode,
    b64encode,
    field_bool,
    field_str,
    key_json,
    kid_json,
    parse_kid,
    parse_object,
    parse_version,
    to_jwk,
)
from ._connection import Limits
from ._dispatch import AuditNotes, Front, PeerLookup, VisibilityGate
from ._idempotency import AdminChange
from ._request import Request, Response, json_response

__all__ = ["ROUTES", "Limits", "Server"]

_MAX_ITEM_CODES = 8  # refused batch items whose index and code the audit record lists
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")
_READY_TTL = 1.0  # seconds a readiness answer (ready or not) is reused


def _item_error(exc: SignerdError) -> dict[str, Any]:
    return {"error": {"code": exc.code, "message": exc.message}}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: (method, path, handler method name): the v1 routes, also checked against openapi.json
ROUTES: tuple[tuple[str, str, str], ...] = (
    ("GET", "/v1/health", "health"),
    ("GET", "/v1/ready", "ready"),
    ("GET", "/v1/openapi.json", "openapi"),
    ("POST", "/v1/keys", "create_key"),
    ("GET", "/v1/keys", "list_keys"),
    ("GET", "/v1/keys/{tenant}/{name}", "get_key"),
    ("POST", "/v1/keys/{tenant}/{name}/rotate", "rotate"),
    ("POST", "/v1/keys/{tenant}/{name}/versions/{version}/{action}", "version_action"),
    ("POST", "/v1/sign", "sign"),
    ("POST", "/v1/verify", "verify"),
    ("GET", "/v1/jwks", "jwks"),
    ("GET", "/v1/kids/{kid}", "kid"),
)
#: what each route is audited as when it is refused before its handler runs
_OPERATIONS = {
    "create_key": Operation.CREATE,
    "list_keys": Operation.LIST,
    "get_key": Operation.LIST,
    "rotate": Operation.ROTATE,
    "version_action": None,  # from {action}
    "sign": Operation.SIGN,
    "verify": Operation.VERIFY,
    "jwks": Operation.JWKS,
    "kid": Operation.JWKS,
}


class Server(Front):
    """The v1 handlers on top of the key service (``Front`` routes, refuses and audits)."""

    def __init__(
        self,
        keys: KeyService,
        *,
        gate: VisibilityGate,
        audit: AuditSink,
        peer_lookup: PeerLookup,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(gate=gate, audit=audit, peer_lookup=peer_lookup, limits=limits)
        self.keys = keys
        self._openapi = importlib.resources.files("signerd").joinpath("openapi.json").read_bytes()
        self._ready_check: asyncio.Future[None] | None = None
        self._ready_at = 0.0
        for method, path, name in ROUTES:
            op = _OPERATIONS.get(name)
            self.router.add(
                method,
                path,
                getattr(self, name),
                operation=op.value if op is not None else None,
                open=name not in _OPERATIONS,
            )

    # --- helpers --------------------------------------------------------------

    async def _body(
        self, request: Request, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if request.content_type != "application/json" and (request.can_read_body or required):
            raise UnsupportedMediaType()
        raw = await request.read()
        return parse_object(raw, allowed, required)

    def _authorize(
        self, request: Request, op: Operation, key: KeyName | None, tenant: str | None
    ) -> None:
        audit: AuditNotes = request["audit"]
        audit.operation, audit.tenant = op, tenant
        if key is not None:
            audit.key = str(key)
        self.gate.authorize(Call(request["peer"], op, tenant, key))

    def _path_key(self, request: Request) -> KeyName:
        return KeyName.of(request.match_info["tenant"], request.match_info["name"])

    # --- health ---------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        """Readiness, answered for anyone: at most one backend check per second, shared."""
        now = asyncio.get_running_loop().time()
        if self._ready_check is None or (
            self._ready_check.done() and now - self._ready_at >= _READY_TTL
        ):
            self._ready_at = now
            self._ready_check = asyncio.ensure_future(self.keys.ready())
            self._ready_check.add_done_callback(_retrieved)
        # a caller that goes away does not cancel the check the others share
        await asyncio.shield(self._ready_check)
        return json_response({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        return Response(body=self._openapi)

    # --- keys -----------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        request["audit"].operation = Operation.CREATE
        body = await self._body(request, {"key"}, {"key"})
        key = KeyName.parse(body["key"])
        self._authorize(request, Operation.CREATE, key, key.tenant)

        async def apply() -> Response:
            info = await self.keys.create(key)
            request["audit"].kid = info.versions[-1].kid
            return json_response(key_json(info), status=201)

        return await self._change(request, "create", key, f"create {key}", apply)

    async def list_keys(self, request: Request) -> Response:
        request["audit"].operation = Operation.LIST
        tenant = request.query.get("tenant")
        if tenant is not None:
            KeyName.of(tenant, "x")  # validates the tenant part
        self._authorize(request, Operation.LIST, None, tenant)
        peer = request["peer"]
        infos = [
            i
            for i in await self.keys.list_keys(tenant)
            if self.gate.visible(peer, Operation.LIST, i.key)
        ]
        return json_response({"keys": [key_json(i) for i in infos]})

    async def get_key(self, request: Request) -> Response:
        request["audit"].operation = Operation.LIST
        key = self._path_key(request)
        self._authorize(request, Operation.LIST, key, key.tenant)
        return json_response(key_json(await self.keys.describe(key)))

    async def rotate(self, request: Request) -> Response:
        request["audit"].operation = Operation.ROTATE
        key = self._path_key(request)
        body = await self._body(request, {"pending"}, set())
        pending = field_bool(body, "pending", False)
        self._authorize(request, Operation.ROTATE, key, key.tenant)

        async def apply() -> Response:
            info, new = await self.keys.rotate(key, pending=pending)
            request["audit"].kid = new.kid
            return json_response({"kid": new.kid, "key": key_json(info)})

        return await self._change(request, "rotate", key, f"rotate {key} {pending}", apply)

    async def version_action(self, request: Request) -> Response:
        action = request.match_info["action"]
        ops = {
            "promote": Operation.PROMOTE,
            "retire": Operation.RETIRE,
            "destroy": Operation.DESTROY,
        }
        if action not in ops:
            raise NotFound()
        op = ops[action]
        request["audit"].operation = op
        key = self._path_key(request)
        version = _version(request.match_info["version"])
        body = await self._body(request, {"confirm"} if op is Operation.DESTROY else set(), set())
        self._authorize(request, op, key, key.tenant)
        request["audit"].kid = key.kid(version)
        confirm = field_str(body, "confirm") if "confirm" in body else None

        async def apply() -> Response:
            if op is Operation.PROMOTE:
                info = await self.keys.promote(key, version)
            elif op is Operation.RETIRE:
                info = await self.keys.retire(key, version)
            else:
                info = await self.keys.destroy(key, version, confirm)
            return json_response(key_json(info))

        what = f"{action} {key} {version} {confirm}"
        return await self._change(request, action, key, what, apply, version)

    # --- what an admin change needs to be said exactly (``_idempotency``) -----------

    async def _change(
        self,
        request: Request,
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
        return await self.admin_change(request, change)

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
            return json_response(key_json(now), status=201), now.versions[0].kid
        if kind == "rotate":
            new = sorted((v for v in now.versions if v.version > before["last"]), key=_number)
            if not new:
                return None
            return json_response({"kid": new[0].kid, "key": key_json(now)}), new[0].kid
        found = now.version(before["version"])
        if (found.state.value if found is not None else "absent") == before["state"]:
            return None
        return json_response(key_json(now)), key.kid(before["version"])

    # --- sign and verify --------------------------------------------------------

    async def sign(self, request: Request) -> Response:
        audit: AuditNotes = request["audit"]
        audit.operation = Operation.SIGN
        body = await self._body(request, {"key", "data", "items"}, set())
        if "items" in body:
            if "key" in body or "data" in body:
                raise InvalidRequest("use either key and data, or items")
            return await self._sign_batch(request, body["items"])
        if "key" not in body or "data" not in body:
            raise InvalidRequest("missing field 'key' or 'data'")
        key = KeyName.parse(body["key"])
        data = b64decode(body, "data")
        audit.hashes = (_sha256(data),)
        self._authorize(request, Operation.SIGN, key, key.tenant)
        kid, signature = await self.keys.sign(key, data)
        audit.kid = kid
        return json_response({"kid": kid, "signature": b64encode(signature)})

    async def _sign_batch(self, request: Request, items: Any) -> Response:
        if not isinstance(items, list) or not items:
            raise InvalidRequest("items must be a non-empty list")
        if len(items) > self.limits.max_batch_items:
            raise InvalidRequest(f"at most {self.limits.max_batch_items} items per batch")
        parsed: list[tuple[KeyName, bytes]] = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"key", "data"}:
                raise InvalidRequest("each item must be an object with exactly key and data")
            parsed.append((KeyName.parse(item["key"]), b64decode(item, "data")))
        audit: AuditNotes = request["audit"]
        peer = request["peer"]
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
            request["audit_reason"] = summary
        return json_response({"results": results})

    async def verify(self, request: Request) -> Response:
        audit: AuditNotes = request["audit"]
        audit.operation = Operation.VERIFY
        body = await self._body(request, {"kid", "data", "signature"}, {"kid", "data", "signature"})
        kid = field_str(body, "kid")
        data = b64decode(body, "data")
        signature = b64decode(body, "signature")
        audit.hashes, audit.kid = (_sha256(data),), kid
        key, _ = parse_kid(kid)
        self._authorize(request, Operation.VERIFY, key, key.tenant)
        key, version = await self.keys.verify(kid, data, signature)
        return json_response({"kid": kid, "key": str(key), "state": version.state.value})

    # --- public keys --------------------------------------------------------------

    async def jwks(self, request: Request) -> Response:
        request["audit"].operation = Operation.JWKS
        tenant = request.query.get("tenant")
        if tenant is not None:
            KeyName.of(tenant, "x")
        self._authorize(request, Operation.JWKS, None, tenant)
        peer = request["peer"]
        keys = [
            to_jwk(v.kid, v.public_key)
            for v in self.keys.published(tenant)
            if self.gate.visible(peer, Operation.JWKS, parse_kid(v.kid)[0])
        ]
        return json_response({"keys": keys}, headers={"Cache-Control": "max-age=60"})

    async def kid(self, request: Request) -> Response:
        request["audit"].operation = Operation.JWKS
        kid = request.match_info["kid"]
        key, _ = parse_kid(kid)
        request["audit"].kid = kid
        self._authorize(request, Operation.JWKS, key, key.tenant)
        key, version = await self.keys.lookup_kid(kid)
        return json_response(kid_json(key, version))


def _note_batch(
    audit: AuditNotes, parsed: list[tuple[KeyName, bytes]], results: list[dict[str, Any]]
) -> str | None:
    """What a batch's record holds, bounded by what was signed: the keyed hash, key, tenant
    and kid of each signed item (each cost a token of the caller's rate); of the refused
    items only their count, the count of each of the 8 most frequent codes, the first 8
    indexes with their code, and one SHA-256 over their key names (in item order, one per
    line)."""
    signed = [i for i, r in enumerate(results) if "signature" in r]
    audit.hashes = tuple(_sha256(parsed[i][1]) for i in signed)
    audit.tenant = ",".join(sorted({parsed[i][0].tenant for i in signed})) or None
    audit.key = ",".join(sorted({str(parsed[i][0]) for i in signed})) or None
    audit.kid = ",".join(sorted({results[i]["kid"] for i in signed})) or None
    refused = [(i, r["error"]["code"]) for i, r in enumerate(results) if "error" in r]
    if not refused:
        return None
    audit.extra_outcome = f"partial:{len(refused)}/{len(results)}"
    audit.item_codes = tuple(f"{i}:{code}" for i, code in refused[:_MAX_ITEM_CODES])
    counts: dict[str, int] = {}
    for _, code in refused:
        counts[code] = counts.get(code, 0) + 1
    common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_ITEM_CODES]
    others = len(counts) - len(common)
    names = "\n".join(str(parsed[i][0]) for i, _ in refused).encode()
    more = len(refused) - len(audit.item_codes)
    return (
        f"refused {len(refused)} of {len(results)} items ("
        + ",".join(f"{code}={n}" for code, n in sorted(common))
        + (f",+{others} other codes" if others else "")
        + "): "
        + ",".join(audit.item_codes)
        + (f",+{more} more" if more else "")
        + f"; names sha256:{_sha256(names)}"
    )


def _retrieved(future: asyncio.Future[None]) -> None:
    """Mark a shared check's failure as seen (its callers may all have gone)."""
    if not future.cancelled():
        future.exception()


def _number(version: KeyVersion) -> int:
    return version.version


def _version(text: str) -> int:
    return parse_version(text)
