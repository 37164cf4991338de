"""The HTTP server: routes of the v1 wire protocol on top of the key service.

Connections, parsing and their limits are ``_protocol``'s; this module routes.
Every request passes ``dispatch``, which gives it a request id, identifies the
peer from the kernel, refuses callers no rule could grant anything before
their body is read (``Gate.admits``), translates every error into the JSON
envelope, and writes the audit record. For sign and admin operations the
record is written before the answer leaves: when it cannot be written, the
answer is replaced by 503 ``audit_unavailable`` and no signature leaves.
Admin operations also write an ``attempt`` record before they act, so an
unwritable trail refuses them before anything changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import logging
import re
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from ._calls import AuditEvent, AuditSink, Call, Gate, Operation, Peer
from ._jwk import to_jwk
from ._keyservice import KeyService
from ._names import KeyName, parse_kid
from ._protocol import Limits, Listener, Throttled
from ._request import Request, Response, json_response
from ._router import Handler, Route, Router
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
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    RateLimited,
    SignerdError,
    UnknownVersion,
    UnsupportedMediaType,
)

__all__ = ["ROUTES", "Limits", "Server"]

log = logging.getLogger("signerd.server")

PeerLookup = Any  # Callable[[socket.socket], Peer]
_UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)
_MAX_ITEM_CODES = 32  # refused batch items whose codes the audit record lists
_QUIET_INTERVAL = 1.0  # one audit record per uid per interval for rate-limited strangers
_MAX_QUIET = 4096
_VERSION_RE = re.compile(r"[1-9][0-9]{0,8}")


class VisibilityGate(Gate, Protocol):
    def visible(self, peer: Peer, op: Operation, key: KeyName) -> bool: ...

    def admits(self, peer: Peer) -> bool:
        """False for a caller no rule could grant anything (raises RateLimited when over)."""
        ...


@dataclass
class _Audit:
    """What a handler learned about its request, for the audit record."""

    operation: Operation = Operation.HEALTH
    tenant: str | None = None
    key: str | None = None
    kid: str | None = None
    hashes: tuple[str, ...] = ()
    extra_outcome: str | None = None
    item_codes: tuple[str, ...] = ()
    label: str | None = None  # the operation recorded for a route outside Operation
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
_ACTIONS = {"promote": Operation.PROMOTE, "retire": Operation.RETIRE, "destroy": Operation.DESTROY}


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
        self._openapi = importlib.resources.files("signerd").joinpath("openapi.json").read_bytes()
        self.router = Router()
        for method, path, name in ROUTES:
            op = _OPERATIONS.get(name)
            self.router.add(
                method,
                path,
                getattr(self, name),
                operation=op.value if op is not None else None,
                open=name not in _OPERATIONS,
            )
        self.listener: Listener | None = None
        self._quiet: dict[int, tuple[float, int]] = {}
        self.quieted = Throttled("signerd.audit_quieted reason=rate_limited", 10.0)

    # --- routes and serving -----------------------------------------------------

    def add_routes(self, routes: Any) -> None:
        """Extra routes: an iterable of (method, path template, async handler).

        Handlers take a ``Request`` and return a ``Response`` (``json_response``).
        They need a grant: callers no rule matches are refused before their body
        is read, and the refusal is audited as ``operation`` (a 4-tuple's last
        item; default ``"request"``).
        """
        for route in routes:
            method, path, handler = route[0], route[1], route[2]
            operation = route[3] if len(route) > 3 else "request"
            self.add_route(method, path, handler, operation=operation)

    def add_route(
        self, method: str, path: str, handler: Handler, *, operation: str = "request"
    ) -> Route:
        return self.router.add(method, path, handler, operation=operation)

    async def serve(self, sock: socket.socket) -> Listener:
        """Start answering on a listening socket (already bound and listening)."""
        self.listener = Listener(sock, self.dispatch, self.precheck, self.limits)
        self.listener.start()
        return self.listener

    async def close(self, grace: float = 10.0) -> None:
        if self.listener is not None:
            await self.listener.close(grace)

    def peer(self, request: Request) -> Peer:
        conn = request.connection
        if conn is None:
            return _UNKNOWN_PEER
        peer = conn.peer
        if peer is None:
            transport = conn.transport
            sock = None if transport is None else transport.get_extra_info("socket")
            if sock is None or sock.family != socket.AF_UNIX:
                return _UNKNOWN_PEER
            try:
                peer = conn.peer = self._peer_lookup(sock)
            except OSError:
                return _UNKNOWN_PEER
        assert isinstance(peer, Peer)
        return peer

    # --- before the body: route, peer, could anything be granted -------------------

    def precheck(self, request: Request) -> SignerdError | None:
        """At the end of the head: the refusal of a caller no rule could grant anything."""
        route, _ = self.router.resolve(request)
        if route is None or route.open:
            return None
        try:
            if self.gate.admits(self.peer(request)):
                return None
        except RateLimited as exc:
            return exc
        return PermissionDenied()

    async def dispatch(self, request: Request) -> Response:
        started = time.monotonic()
        rid = request_id_from(request.headers.get("X-Request-Id"), uuid.uuid4().hex)
        request["rid"] = rid
        audit = request["audit"] = _Audit()
        headers: dict[str, str] = {"X-Request-Id": rid}
        try:
            request["peer"] = self.peer(request)
            route: Route | None = request.route
            if route is None:
                route, allow = self.router.resolve(request)
                if route is None:
                    if allow:
                        headers["Allow"] = ", ".join(allow)
                        raise MethodNotAllowed()
                    raise NotFound()
                if not route.open and request.refused is None:
                    request.refused = self.precheck(request)
            if request.refused is not None:
                self._refused_early(request, route, audit)
                raise request.refused
            response = await route.handler(request)
            await self._record(request, audit, "ok", response.status, request.get("audit_reason"))
        except SignerdError as exc:
            if self._quieted(request, exc):
                audit.written = True
            response = self._error(rid, exc)
            await self._record(request, audit, exc.code, exc.status, exc.message)
        except Exception as exc:
            log.error(
                "signerd.internal_error request_id=%s error=%s\n%s",
                rid,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)),
            )
            response = self._error(rid, InternalError())
            await self._record(request, audit, "internal_error", 500, None)
        response.headers.update(headers)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "signerd.request id=%s took=%.6f status=%d",
                rid,
                time.monotonic() - started,
                response.status,
            )
        return response

    def _refused_early(self, request: Request, route: Route, audit: _Audit) -> None:
        op = route.operation
        if op is None:  # version actions: the operation is in the path
            action = _ACTIONS.get(request.match_info.get("action", ""))
            audit.operation = action if action is not None else Operation.LIST
            if action is None:
                audit.label = "request"
        elif op in Operation.__members__.values():
            audit.operation = Operation(op)
        else:
            audit.operation, audit.label = Operation.LIST, op

    def _quieted(self, request: Request, exc: SignerdError) -> bool:
        """A stranger over its bucket: one audit record per uid per interval, the rest counted."""
        if not isinstance(exc, RateLimited) or request.refused is not exc:
            return False
        uid = request["peer"].uid
        now = time.monotonic()
        last, skipped = self._quiet.get(uid, (-1e18, 0))
        if now - last < _QUIET_INTERVAL:
            self._quiet[uid] = (last, skipped + 1)
            self.quieted.note(uid=uid)
            return True
        if len(self._quiet) >= _MAX_QUIET:
            self._quiet.clear()
        self._quiet[uid] = (now, 0)
        if skipped:
            exc.message = (
                f"over the rate limit for callers without a grant ({skipped} not recorded)"
            )
        return False

    def _error(self, rid: str, exc: SignerdError) -> Response:
        headers = {"Retry-After": "1"} if exc.retryable else None
        return json_response(exc.to_wire(rid), status=exc.status, headers=headers)

    async def _record(
        self, request: Request, audit: _Audit, outcome: str, status: int, reason: str | None
    ) -> None:
        """Write the final record. For fail-closed operations a failure propagates."""
        if audit.operation is Operation.HEALTH or audit.written:
            return
        event = AuditEvent(
            time=time.time(),
            request_id=request["rid"],
            peer=request.get("peer", _UNKNOWN_PEER),
            operation=audit.label or audit.operation.value,
            outcome=audit.extra_outcome if outcome == "ok" and audit.extra_outcome else outcome,
            tenant=audit.tenant,
            key=audit.key,
            kid=audit.kid,
            payload_sha256=audit.hashes,
            reason=reason,
            status=status,
            item_codes=audit.item_codes,
        )
        audit.written = True
        try:
            await self.audit.record(event)
        except AuditUnavailable:
            if outcome == "ok" and audit.operation.fails_closed:
                raise
            log.error("signerd.audit_unavailable request_id=%s outcome=%s", request["rid"], outcome)

    async def _attempt(self, request: Request, audit: _Audit) -> None:
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
        self, request: Request, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if request.content_type != "application/json" and (request.can_read_body or required):
            raise UnsupportedMediaType()
        raw = await request.read()
        return parse_object(raw, allowed, required)

    def _authorize(
        self, request: Request, op: Operation, key: KeyName | None, tenant: str | None
    ) -> None:
        audit: _Audit = request["audit"]
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
        await self.keys.ready()
        return json_response({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        return Response(body=self._openapi)

    # --- keys -----------------------------------------------------------------

    async def create_key(self, request: Request) -> Response:
        request["audit"].operation = Operation.CREATE
        body = await self._body(request, {"key"}, {"key"})
        key = KeyName.parse(body["key"])
        self._authorize(request, Operation.CREATE, key, key.tenant)
        await self._attempt(request, request["audit"])
        info = await self.keys.create(key)
        request["audit"].kid = info.versions[-1].kid
        return json_response(key_json(info), status=201)

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
        await self._attempt(request, request["audit"])
        info, new = await self.keys.rotate(key, pending=pending)
        request["audit"].kid = new.kid
        return json_response({"kid": new.kid, "key": key_json(info)})

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
        await self._attempt(request, request["audit"])
        if op is Operation.PROMOTE:
            info = await self.keys.promote(key, version)
        elif op is Operation.RETIRE:
            info = await self.keys.retire(key, version)
        else:
            confirm = field_str(body, "confirm") if "confirm" in body else None
            info = await self.keys.destroy(key, version, confirm)
        return json_response(key_json(info))

    # --- sign and verify --------------------------------------------------------

    async def sign(self, request: Request) -> Response:
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
        refused = [(i, r["error"]["code"]) for i, r in enumerate(results) if "error" in r]
        if refused:
            audit.extra_outcome = f"partial:{len(refused)}/{len(results)}"
            audit.item_codes = tuple(f"{i}:{code}" for i, code in refused[:_MAX_ITEM_CODES])
            more = len(refused) - len(audit.item_codes)
            listed = ",".join(audit.item_codes) + (f",+{more} more" if more else "")
            if len(refused) == len(results) and all(
                code == PermissionDenied.code for _, code in refused
            ):
                raise PermissionDenied(f"every item was refused: {listed}")
            request["audit_reason"] = f"refused items: {listed}"
        return json_response({"results": results})

    async def verify(self, request: Request) -> Response:
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


def _version(text: str) -> int:
    if not _VERSION_RE.fullmatch(text):  # ASCII digits only: int() takes others
        raise UnknownVersion()
    return int(text)
