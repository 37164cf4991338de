"""The federation endpoints, and the verification in its fixed order.

Verification (both flows), each step refusing with its own code:

1. parse and bound the input; unknown fields are errors (400);
2. look up the kid: signerd's own keyring first (one re-read on a miss), then
   the trusted peer keys of the envelope's tenant (``unknown_kid`` 401);
3. tenant mapping: the kid belongs to the envelope's tenant
   (``tenant_mismatch`` 403) and the caller's policy grants ``verify`` on it
   (``permission_denied`` 403);
4. the signature (``invalid_signature`` 401);
5. the timestamp within ``federation.skew`` both ways (``stale_timestamp`` 401);
6. the schema (feedback, ``schema_mismatch`` 422) and the attestation when
   asked (``attestation_mismatch`` 403);
7. record the nonce, scoped by the public key that verified the signature
   (its RFC 7638 thumbprint), not by the tenant and kid the request names
   (``replayed_nonce`` 409, ``nonce_store_unavailable`` 503): the telemetry
   input covers neither, so one key trusted under two labels must not accept
   one envelope twice. Only a request that passed 1-6 reaches the store, so a
   forged or stale request never burns a good nonce.

Handlers use only the request API the server guarantees: ``match_info``,
``query``, ``headers``, ``content_type``, ``read()``, and the ``peer``,
``rid`` and ``audit`` items.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..audit import AuditSink
from ..authz import Call, Gate, Operation
from ..backends import VersionState
from ..errors import (
    AttestationMismatch,
    BackendUnavailable,
    InvalidRequest,
    InvalidSignature,
    KeyExists,
    PayloadTooLarge,
    SchemaMismatch,
    SharedPeerKey,
    StaleTimestamp,
    TenantMismatch,
    UnknownKey,
    UnknownKid,
    UnsupportedMediaType,
)
from ..keys import KeyService
from ..server._idempotency import AdminChange, Made
from ..server._request import Request, Response, json_response
from ..wire import (
    FEEDBACK_FIELDS,
    MIN_NONCE_BYTES,
    KeyName,
    attestation_of_body,
    attestation_of_data,
    b64decode,
    b64encode,
    b64url,
    canonicalize,
    check_attestation,
    check_json,
    check_nonce,
    check_schema,
    check_tenant,
    check_timestamp,
    feedback_input,
    parse_json,
    parse_kid,
    telemetry_input,
    thumbprint,
)
from ._nonces import NonceStore, SqliteNonceStore
from ._settings import FederationSettings
from ._trust import PeerKey, TrustedKeys, jwk_public, valid_peer_kid

__all__ = ["ROUTES", "Federation", "attach", "federation_of"]

Handler = Callable[[Request], Awaitable[Response]]

#: (method, path, handler name): the federation routes, documented in openapi.json
#: (method, path, handler name, operation a refusal before the body is audited as)
ROUTES: tuple[tuple[str, str, str, str], ...] = (
    ("POST", "/v1/telemetry/sign", "telemetry_sign", "sign"),
    ("POST", "/v1/telemetry/verify", "telemetry_verify", "verify"),
    ("POST", "/v1/feedback/sign", "feedback_sign", "sign"),
    ("POST", "/v1/feedback/verify", "feedback_verify", "verify"),
    ("POST", "/v1/trusted-keys", "trust_add", "trust"),
    ("GET", "/v1/trusted-keys", "trust_list", "list"),
    ("POST", "/v1/trusted-keys/{tenant}/{kid}/retire", "trust_retire", "trust"),
)

_ENVELOPE = set(FEEDBACK_FIELDS)


class Host(Protocol):
    """What the federation needs of the server (read at each request: SIGHUP swaps the gate)."""

    @property
    def keys(self) -> KeyService: ...

    @property
    def gate(self) -> Gate: ...

    @property
    def audit(self) -> AuditSink: ...

    def add_routes(self, routes: Iterable[tuple[Any, ...]]) -> None: ...

    async def admin_change(self, request: Request, change: AdminChange) -> Response: ...


_attached: weakref.WeakKeyDictionary[Any, Federation] = weakref.WeakKeyDictionary()


def attach(server: Host, federation: Federation) -> None:
    """Serve ``federation``'s endpoints on ``server``."""
    _attached[server] = federation
    server.add_routes(
        (method, path, getattr(federation, name), operation)
        for method, path, name, operation in ROUTES
    )


def federation_of(server: Any) -> Federation | None:
    return _attached.get(server)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class _Resolved:
    tenant: str
    key: KeyName | None  # one of signerd's own keys, or None for a trusted peer key
    verifier: Ed25519PublicKey | None  # peer keys only
    public: bytes  # the raw public key: nonces are unique per public key


class Federation:
    def __init__(
        self,
        host: Host,
        settings: FederationSettings,
        *,
        store: NonceStore,
        trusted: TrustedKeys,
        max_body_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.time,
        admin_guard: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        self.host = host
        self.settings = settings
        self.store = store
        self.trusted = trusted
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        #: held around trusted-key changes (the workers' cross-process admin lock)
        self.admin_guard = admin_guard

    def _admin(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext() if self.admin_guard is None else self.admin_guard()

    @classmethod
    def from_settings(
        cls,
        host: Host,
        settings: FederationSettings,
        *,
        max_body_bytes: int = 1 << 20,
        admin_guard: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
    ) -> Federation:
        store: NonceStore
        if settings.store == "redis":
            from ._redis_store import RedisNonceStore

            store = RedisNonceStore(
                settings.redis_url,
                timeout=settings.timeout,
                prefix=settings.redis_prefix,
                pool=settings.redis_pool,
                max_entries_per_tenant=settings.max_entries_per_tenant,
            )
        else:
            store = SqliteNonceStore(
                settings.sqlite_path,
                max_entries=settings.max_entries,
                max_entries_per_tenant=settings.max_entries_per_tenant,
                timeout=settings.timeout,
            )
        trusted = TrustedKeys(
            settings.state_dir, settings.trusted, allow_shared=settings.allow_shared_keys
        )
        return cls(
            host,
            settings,
            store=store,
            trusted=trusted,
            max_body_bytes=max_body_bytes,
            admin_guard=admin_guard,
        )

    async def close(self) -> None:
        await self.store.close()

    # --- helpers -------------------------------------------------------------------

    async def _body(
        self, request: Request, allowed: set[str], required: set[str], max_depth: int
    ) -> dict[str, Any]:
        if request.content_type != "application/json":
            raise UnsupportedMediaType()
        raw = await request.read()
        body = parse_json(raw, max_bytes=self.max_body_bytes, max_depth=max_depth)
        if not isinstance(body, dict):
            raise InvalidRequest("body must be a JSON object")
        return _fields(body, allowed, required, "")

    def _authorize(
        self, request: Request, op: Operation, tenant: str | None, key: KeyName | None
    ) -> None:
        audit = request["audit"]
        audit.operation, audit.tenant = op, tenant
        if key is not None:
            audit.key = str(key)
        self.host.gate.authorize(Call(request["peer"], op, tenant, key))

    def _canonical_data(self, data: Any) -> bytes:
        check_json(data, self.settings.max_depth)
        out = canonicalize(data)
        if len(out) > self.settings.max_json_bytes:
            raise PayloadTooLarge(f"canonical data over {self.settings.max_json_bytes} bytes")
        return out

    def _own_key_known(self, key: KeyName) -> bool:
        return any(parse_kid(v.kid)[0] == key for v in self.host.keys.published(key.tenant))

    async def _active_kid(self, key: KeyName) -> str:
        for version in self.host.keys.published(key.tenant):
            if version.state is VersionState.ACTIVE and parse_kid(version.kid)[0] == key:
                return version.kid
        active = (await self.host.keys.describe(key)).active
        if active is None:
            raise BackendUnavailable("the key has no active version")
        return active.kid

    # --- telemetry -------------------------------------------------------------------

    async def telemetry_sign(self, request: Request) -> Response:
        audit = request["audit"]
        audit.operation = Operation.SIGN
        body = await self._body(request, {"key", "body"}, {"key", "body"}, 2)
        key = KeyName.parse(body["key"])
        payload = b64decode(body, "body")
        timestamp = str(int(self.clock()))
        nonce = b64url(os.urandom(MIN_NONCE_BYTES))
        message = telemetry_input(timestamp, nonce, payload)
        audit.hashes = (_sha256(message),)
        self._authorize(request, Operation.SIGN, key.tenant, key)
        kid, signature = await self.host.keys.sign(key, message)
        audit.kid = kid
        return json_response(
            {"kid": kid, "timestamp": timestamp, "nonce": nonce, "signature": b64encode(signature)}
        )

    async def telemetry_verify(self, request: Request) -> Response:
        request["audit"].operation = Operation.VERIFY
        fields = {"tenant", "kid", "timestamp", "nonce", "body", "signature"}
        body = await self._body(request, fields | {"attestation"}, fields, 2)
        tenant = check_tenant(body["tenant"])
        kid = _kid(body["kid"])
        timestamp = body["timestamp"]
        signed = check_timestamp(timestamp)
        nonce = check_nonce(body["nonce"])
        payload = b64decode(body, "body")
        signature = b64decode(body, "signature")
        expected = check_attestation(body["attestation"]) if "attestation" in body else None
        message = telemetry_input(timestamp, nonce, payload)

        def step6() -> None:
            if expected is not None:
                found = attestation_of_body(payload, max_depth=self.settings.max_depth)
                if found != expected:
                    raise AttestationMismatch()

        return await self._verify(request, tenant, kid, message, signature, signed, nonce, step6)

    # --- feedback -----------------------------------------------------------------------

    async def feedback_sign(self, request: Request) -> Response:
        audit = request["audit"]
        audit.operation = Operation.SIGN
        depth = self.settings.max_depth + 1
        body = await self._body(
            request, {"key", "schema", "data"}, {"key", "schema", "data"}, depth
        )
        key = KeyName.parse(body["key"])
        schema = check_schema(body["schema"])
        data = body["data"]
        canonical_data = self._canonical_data(data)
        self._authorize(request, Operation.SIGN, key.tenant, key)
        signed_at = str(int(self.clock()))
        nonce = b64url(os.urandom(MIN_NONCE_BYTES))
        kid = await self._active_kid(key)
        for _ in range(3):  # the active version may change under us: sign again with the new kid
            message = feedback_input(key.tenant, signed_at, nonce, schema, kid, canonical_data)
            audit.hashes = (_sha256(message),)
            used, signature = await self.host.keys.sign(key, message)
            audit.kid = used
            if used == kid:
                envelope = {
                    "tenant": key.tenant,
                    "signed_at": signed_at,
                    "nonce": nonce,
                    "schema": schema,
                    "kid": kid,
                    "data": json.loads(canonical_data),  # the value as signed: 1E2 is 100
                    "signature": b64encode(signature),
                }
                return json_response(envelope)
            kid = used
        raise BackendUnavailable("the key's active version keeps changing; try again")

    async def feedback_verify(self, request: Request) -> Response:
        request["audit"].operation = Operation.VERIFY
        depth = self.settings.max_depth + 2
        body = await self._body(
            request, {"envelope", "schema", "attestation"}, {"envelope", "schema"}, depth
        )
        envelope = body["envelope"]
        if not isinstance(envelope, dict):
            raise InvalidRequest("field 'envelope' must be an object")
        envelope = _fields(envelope, _ENVELOPE, _ENVELOPE, "envelope")
        expected_schema = check_schema(body["schema"])
        expected = check_attestation(body["attestation"]) if "attestation" in body else None
        tenant = check_tenant(envelope["tenant"])
        signed_at = envelope["signed_at"]
        signed = check_timestamp(signed_at, "envelope.signed_at")
        nonce = check_nonce(envelope["nonce"])
        schema = check_schema(envelope["schema"], "envelope.schema")
        kid = _kid(envelope["kid"])
        signature = b64decode(envelope, "signature")
        data = envelope["data"]
        message = feedback_input(tenant, signed_at, nonce, schema, kid, self._canonical_data(data))

        def step6() -> None:
            if schema != expected_schema:
                raise SchemaMismatch()
            if expected is not None and attestation_of_data(data) != expected:
                raise AttestationMismatch()

        return await self._verify(request, tenant, kid, message, signature, signed, nonce, step6)

    # --- the verification -------------------------------------------------------------

    async def _verify(
        self,
        request: Request,
        tenant: str,
        kid: str,
        message: bytes,
        signature: bytes,
        signed: int,
        nonce: str,
        step6: Callable[[], None],
    ) -> Response:
        audit = request["audit"]
        audit.tenant, audit.kid, audit.hashes = tenant, kid, (_sha256(message),)
        resolved = await self._resolve(tenant, kid)  # 2
        if resolved.tenant != tenant:  # 3
            raise TenantMismatch()
        self._authorize(request, Operation.VERIFY, tenant, resolved.key)
        if resolved.verifier is None:  # 4
            await self.host.keys.verify(kid, message, signature)
        else:
            try:
                resolved.verifier.verify(signature, message)
            except _CryptoInvalidSignature as exc:
                raise InvalidSignature() from exc
        if abs(self.clock() - signed) > self.settings.skew:  # 5
            raise StaleTimestamp()
        step6()  # 6
        scope = thumbprint(resolved.public)  # 7
        await self.store.add(scope, nonce, float(self.settings.nonce_ttl), tenant=tenant)
        return json_response(
            {
                "kid": kid,
                "tenant": tenant,
                "source": "keyring" if resolved.key is not None else "trusted_peer",
                "key": str(resolved.key) if resolved.key is not None else None,
            }
        )

    async def _resolve(self, tenant: str, kid: str) -> _Resolved:
        own = _own_kid(kid)
        if own is not None:
            try:
                key, version = await self.host.keys.lookup_kid(kid)
                return _Resolved(key.tenant, key, None, version.public_key)
            except UnknownKid:
                if self._own_key_known(own):
                    raise  # a kid of one of our keys never resolves to a peer key
        peer, verifier = self.trusted.lookup(tenant, kid)
        return _Resolved(peer.tenant, None, verifier, peer.public)

    # --- trusted peer keys ---------------------------------------------------------------

    async def trust_add(self, request: Request) -> Response:
        audit = request["audit"]
        audit.operation = Operation.TRUST
        body = await self._body(request, {"tenant", "kid", "jwk"}, {"tenant", "kid", "jwk"}, 3)
        tenant = check_tenant(body["tenant"])
        kid = _kid(body["kid"])
        public = jwk_public(body["jwk"], kid)
        audit.kid = kid
        self._authorize(request, Operation.TRUST, tenant, None)
        own = _own_kid(kid)
        if own is not None:
            try:
                await self.host.keys.describe(own)
            except UnknownKey:
                pass
            else:
                raise KeyExists("the kid names one of this signerd's own keys")
        if not self.settings.allow_shared_keys:  # checked again under the lock by trusted.add
            if self.trusted.tenants_of(public) - {tenant}:
                raise SharedPeerKey()
            if any(
                v.public_key == public and parse_kid(v.kid)[0].tenant != tenant
                for v in self.host.keys.published()
            ):
                raise SharedPeerKey(
                    "this public key is one of this signerd's keys of another tenant"
                )

        async def apply() -> Response:
            try:
                added = await asyncio.to_thread(self.trusted.add, tenant, kid, public)
            except OSError as exc:
                raise BackendUnavailable("the trusted key store cannot be written") from exc
            return json_response(added.to_json(), status=201)

        what = f"trust-add {tenant} {kid} {b64url(public)}"
        return await self._trust_change(request, "trust-add", tenant, kid, what, apply)

    async def trust_list(self, request: Request) -> Response:
        request["audit"].operation = Operation.LIST
        tenant = request.query.get("tenant")
        if tenant is not None:
            check_tenant(tenant)
        self._authorize(request, Operation.LIST, tenant, None)
        keys = self.trusted.list(tenant)
        return json_response({"keys": [k.to_json() for k in keys]})

    async def trust_retire(self, request: Request) -> Response:
        audit = request["audit"]
        audit.operation = Operation.TRUST
        tenant = check_tenant(request.match_info["tenant"])
        kid = _kid(request.match_info["kid"])
        raw = await request.read()
        if raw.strip() and parse_json(raw, max_bytes=64, max_depth=1) != {}:
            raise InvalidRequest("retire takes no fields")
        audit.kid = kid
        self._authorize(request, Operation.TRUST, tenant, None)

        async def apply() -> Response:
            try:
                retired = await asyncio.to_thread(self.trusted.retire, tenant, kid)
            except OSError as exc:
                raise BackendUnavailable("the trusted key store cannot be written") from exc
            return json_response(retired.to_json())

        what = f"trust-retire {tenant} {kid}"
        return await self._trust_change(request, "trust-retire", tenant, kid, what, apply)

    async def _trust_change(
        self,
        request: Request,
        kind: str,
        tenant: str,
        kid: str,
        what: str,
        apply: Callable[[], Awaitable[Response]],
    ) -> Response:
        """A trusted-key change run by the host: intent record, Idempotency-Key, outcome."""

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
            return json_response(found.to_json(), status=201 if kind == "trust-add" else 200), kid

        change = AdminChange(kind, f"trust {tenant} {kid}", what, self._admin, apply, before, made)
        return await self.host.admin_change(request, change)


def _fields(
    body: dict[str, Any], allowed: set[str], required: set[str], where: str
) -> dict[str, Any]:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(f"unknown field in {where or 'the body'}")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidRequest(f"missing field {missing[0]!r}" + (f" in {where}" if where else ""))
    return body


def _kid(value: Any) -> str:
    if not valid_peer_kid(value):
        raise InvalidRequest("field 'kid' must match [A-Za-z0-9._:-]{1,128}")
    assert isinstance(value, str)
    return value


def _own_kid(kid: str) -> KeyName | None:
    try:
        return parse_kid(kid)[0]
    except UnknownKid:
        return None
