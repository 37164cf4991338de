"""The HTTP server: routes of the v1 wire protocol on top of the key service.

Every request passes one middleware that gives it a request id, identifies
the peer from the kernel, translates every error into the JSON envelope, and
writes the audit record. For sign and admin operations the record is written
before the answer leaves: when it cannot be written, the answer is replaced
by 503 ``audit_unavailable`` and no signature leaves. Admin operations also
write an ``attempt`` record before they act, so an unwritable trail refuses
them before anything changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import logging
import socket
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiohttp import web

from ._calls import AuditEvent, AuditSink, Call, Gate, Operation, Peer
from ._jwk import to_jwk
from ._keyservice import KeyService
from ._names import KeyName, parse_kid
from ._wire import (
    b64decode,
    b64encode,
    field_bool,
    field_str,
    key_json,
    kid_json,
    parse_object,
    request_id_from,
)
from .errors import (
    AuditUnavailable,
    InternalError,
    InvalidRequest,
    InvalidState,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    SignerdError,
    UnknownVersion,
    UnsupportedMediaType,
)

log = logging.getLogger("signerd.server")

PeerLookup = Callable[[socket.socket], Peer]
_UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)


class VisibilityGate(Gate, Protocol):
    def visible(self, peer: Peer, op: Operation, key: KeyName) -> bool: ...


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1 << 20
    max_batch_items: int = 256


@dataclass
class _Audit:
    """What a handler learned about its request, for the audit record."""

    operation: Operation = Operation.HEALTH
    tenant: str | None = None
    key: str | None = None
    kid: str | None = None
    hashes: tuple[str, ...] = ()
    extra_outcome: str | None = None
    written: bool = field(default=False)


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


class Server:
    def __init__(
        self,
        keys: KeyService,
        *,
        gate: VisibilityGate,
        audit: AuditSink,
        peer_lookup: PeerLookup,
        limits: Limits | None = None,
    ) -> None:
        self.keys = keys
        self.gate = gate
        self.audit = audit
        self._peer_lookup = peer_lookup
        self.limits = limits or Limits()
        self._peers: weakref.WeakKeyDictionary[Any, Peer] = weakref.WeakKeyDictionary()
        self._openapi = importlib.resources.files("signerd").joinpath("openapi.json").read_bytes()

    # --- application --------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._middleware], client_max_size=self.limits.max_body_bytes
        )
        for method, path, handler in ROUTES:
            app.router.add_route(method, path, getattr(self, handler))
        from .federation.routes import bound_routes  # docs/federation.md

        for method, path, federation_handler in bound_routes(self):
            app.router.add_route(method, path, federation_handler)
        return app

    def peer(self, request: web.Request) -> Peer:
        transport = request.transport
        if transport is None:
            return _UNKNOWN_PEER
        peer = self._peers.get(transport)
        if peer is None:
            sock = transport.get_extra_info("socket")
            if sock is None or sock.family != socket.AF_UNIX:
                return _UNKNOWN_PEER
            peer = self._peer_lookup(sock)
            self._peers[transport] = peer
        return peer

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.time()
        rid = request_id_from(request.headers.get("X-Request-Id"), uuid.uuid4().hex)
        request["rid"] = rid
        audit = request["audit"] = _Audit()
        try:
            request["peer"] = self.peer(request)
            response = await handler(request)
            await self._record(request, audit, "ok", response.status, None)
        except web.HTTPException as exc:
            error = _from_http(exc)
            response = self._error(rid, error)
            await self._record(request, audit, error.code, error.status, None)
        except SignerdError as exc:
            response = self._error(rid, exc)
            await self._record(request, audit, exc.code, exc.status, exc.message)
        except Exception:
            log.exception("signerd.internal_error request_id=%s", rid)
            response = self._error(rid, InternalError())
            await self._record(request, audit, "internal_error", 500, None)
        response.headers["X-Request-Id"] = rid
        log.debug(
            "signerd.request id=%s path=%s took=%.6f", rid, request.path, time.time() - started
        )
        return response

    def _error(self, rid: str, exc: SignerdError) -> web.Response:
        headers = {"Retry-After": "1"} if exc.retryable else None
        return web.json_response(exc.to_wire(rid), status=exc.status, headers=headers)

    async def _record(
        self, request: web.Request, audit: _Audit, outcome: str, status: int, reason: str | None
    ) -> None:
        """Write the final record. For fail-closed operations a failure propagates."""
        if audit.operation is Operation.HEALTH or audit.written:
            return
        event = AuditEvent(
            time=time.time(),
            request_id=request["rid"],
            peer=request.get("peer", _UNKNOWN_PEER),
            operation=audit.operation.value,
            outcome=audit.extra_outcome if outcome == "ok" and audit.extra_outcome else outcome,
            tenant=audit.tenant,
            key=audit.key,
            kid=audit.kid,
            payload_sha256=audit.hashes,
            reason=reason,
            status=status,
        )
        audit.written = True
        try:
            await self.audit.record(event)
        except AuditUnavailable:
            if outcome == "ok" and audit.operation.fails_closed:
                raise
            log.error("signerd.audit_unavailable request_id=%s outcome=%s", request["rid"], outcome)

    async def _attempt(self, request: web.Request, audit: _Audit) -> None:
        """Admin operations: an attempt record before acting (fails closed)."""
        event = AuditEvent(
            time=time.time(),
            request_id=request["rid"],
            peer=request["peer"],
            operation=audit.operation.value,
            outcome="attempt",
            tenant=audit.tenant,
            key=audit.key,
            kid=audit.kid,
            status=0,
        )
        await self.audit.record(event)

    # --- helpers --------------------------------------------------------------

    async def _body(
        self, request: web.Request, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if request.content_type != "application/json" and (request.can_read_body or required):
            raise UnsupportedMediaType()
        raw = await request.read()
        return parse_object(raw, allowed, required)

    def _authorize(
        self, request: web.Request, op: Operation, key: KeyName | None, tenant: str | None
    ) -> None:
        audit: _Audit = request["audit"]
        audit.operation, audit.tenant = op, tenant
        if key is not None:
            audit.key = str(key)
        self.gate.authorize(Call(request["peer"], op, tenant, key))

    def _path_key(self, request: web.Request) -> KeyName:
        return KeyName.of(request.match_info["tenant"], request.match_info["name"])

    # --- health ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        await self.keys.ready()
        return web.json_response({"status": "ready"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self._openapi, content_type="application/json")

    # --- keys -----------------------------------------------------------------

    async def create_key(self, request: web.Request) -> web.Response:
        request["audit"].operation = Operation.CREATE
        body = await self._body(request, {"key"}, {"key"})
        key = KeyName.parse(body["key"])
        self._authorize(request, Operation.CREATE, key, key.tenant)
        await self._attempt(request, request["audit"])
        info = await self.keys.create(key)
        request["audit"].kid = info.versions[-1].kid
        return web.json_response(key_json(info), status=201)

    async def list_keys(self, request: web.Request) -> web.Response:
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
        return web.json_response({"keys": [key_json(i) for i in infos]})

    async def get_key(self, request: web.Request) -> web.Response:
        request["audit"].operation = Operation.LIST
        key = self._path_key(request)
        self._authorize(request, Operation.LIST, key, key.tenant)
        return web.json_response(key_json(await self.keys.describe(key)))

    async def rotate(self, request: web.Request) -> web.Response:
        request["audit"].operation = Operation.ROTATE
        key = self._path_key(request)
        body = await self._body(request, {"pending"}, set())
        pending = field_bool(body, "pending", False)
        self._authorize(request, Operation.ROTATE, key, key.tenant)
        await self._attempt(request, request["audit"])
        info, new = await self.keys.rotate(key, pending=pending)
        request["audit"].kid = new.kid
        return web.json_response({"kid": new.kid, "key": key_json(info)})

    async def version_action(self, request: web.Request) -> web.Response:
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
        await self._attempt(request, request["audit"])
        if op is Operation.PROMOTE:
            info = await self.keys.promote(key, version)
        elif op is Operation.RETIRE:
            info = await self.keys.retire(key, version)
        else:
            confirm = field_str(body, "confirm") if "confirm" in body else None
            info = await self.keys.destroy(key, version, confirm)
        return web.json_response(key_json(info))

    # --- sign and verify --------------------------------------------------------

    async def sign(self, request: web.Request) -> web.Response:
        audit: _Audit = request["audit"]
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
        return web.json_response({"kid": kid, "signature": b64encode(signature)})

    async def _sign_batch(self, request: web.Request, items: Any) -> web.Response:
        if not isinstance(items, list) or not items:
            raise InvalidRequest("items must be a non-empty list")
        if len(items) > self.limits.max_batch_items:
            raise InvalidRequest(f"at most {self.limits.max_batch_items} items per batch")
        parsed: list[tuple[KeyName, bytes]] = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"key", "data"}:
                raise InvalidRequest("each item must be an object with exactly key and data")
            parsed.append((KeyName.parse(item["key"]), b64decode(item, "data")))
        audit: _Audit = request["audit"]
        audit.hashes = tuple(_sha256(d) for _, d in parsed)
        tenants = sorted({k.tenant for k, _ in parsed})
        audit.tenant = ",".join(tenants)
        audit.key = ",".join(sorted({str(k) for k, _ in parsed}))
        peer = request["peer"]
        kids: set[str] = set()

        async def one(key: KeyName, data: bytes) -> dict[str, Any]:
            try:
                self.gate.authorize(Call(peer, Operation.SIGN, key.tenant, key))
                kid, sig = await self.keys.sign(key, data)
            except SignerdError as exc:
                return {"error": {"code": exc.code, "message": exc.message}}
            kids.add(kid)
            return {"kid": kid, "signature": b64encode(sig)}

        results = list(await asyncio.gather(*(one(k, d) for k, d in parsed)))
        audit.kid = ",".join(sorted(kids)) or None
        failed = sum(1 for r in results if "error" in r)
        if failed:
            audit.extra_outcome = f"partial:{failed}/{len(results)}"
        return web.json_response({"results": results})

    async def verify(self, request: web.Request) -> web.Response:
        audit: _Audit = request["audit"]
        audit.operation = Operation.VERIFY
        body = await self._body(request, {"kid", "data", "signature"}, {"kid", "data", "signature"})
        kid = field_str(body, "kid")
        data = b64decode(body, "data")
        signature = b64decode(body, "signature")
        audit.hashes, audit.kid = (_sha256(data),), kid
        key, _ = parse_kid(kid)
        self._authorize(request, Operation.VERIFY, key, key.tenant)
        key, version = await self.keys.verify(kid, data, signature)
        return web.json_response({"kid": kid, "key": str(key), "state": version.state.value})

    # --- public keys --------------------------------------------------------------

    async def jwks(self, request: web.Request) -> web.Response:
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
        return web.json_response({"keys": keys}, headers={"Cache-Control": "max-age=60"})

    async def kid(self, request: web.Request) -> web.Response:
        request["audit"].operation = Operation.JWKS
        kid = request.match_info["kid"]
        key, _ = parse_kid(kid)
        request["audit"].kid = kid
        self._authorize(request, Operation.JWKS, key, key.tenant)
        key, version = await self.keys.lookup_kid(kid)
        return web.json_response(kid_json(key, version))


def _version(text: str) -> int:
    if not text.isdigit() or text.startswith("0") or len(text) > 9:
        raise UnknownVersion()
    return int(text)


def _from_http(exc: web.HTTPException) -> SignerdError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge()
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed()
    if isinstance(exc, web.HTTPNotFound):
        return NotFound()
    if isinstance(exc, web.HTTPForbidden):
        return PermissionDenied()
    if exc.status == 409:
        return InvalidState()
    return InvalidRequest(exc.reason)
