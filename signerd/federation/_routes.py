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

Handlers take the server's ``RequestContext``: they read their body,
authorize and note the audit record through it. The trusted peer keys'
endpoints are ``_trust_routes``'.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..authz import Operation
from ..backends import VersionState
from ..errors import (
    AttestationMismatch,
    BackendUnavailable,
    InvalidRequest,
    InvalidSignature,
    PayloadTooLarge,
    SchemaMismatch,
    StaleTimestamp,
    TenantMismatch,
    UnknownKid,
)
from ..server import Handler, RequestContext, Response, check_fields, json_response, sha256_hex
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
    parse_kid,
    telemetry_input,
    thumbprint,
)
from ._nonces import NonceStore, SqliteNonceStore
from ._settings import FederationSettings
from ._trust import TrustedKeys
from ._trust_routes import TrustRoutes, own_kid, peer_kid

if TYPE_CHECKING:
    from ..keys._service import KeyService

__all__ = ["ROUTES", "Federation", "Host", "RouteHost", "attach"]

#: (method, path, handler, operation): the federation routes, documented in openapi.json
ROUTES: tuple[tuple[str, str, str, Operation], ...] = (
    ("POST", "/v1/telemetry/sign", "telemetry_sign", Operation.SIGN),
    ("POST", "/v1/telemetry/verify", "telemetry_verify", Operation.VERIFY),
    ("POST", "/v1/feedback/sign", "feedback_sign", Operation.SIGN),
    ("POST", "/v1/feedback/verify", "feedback_verify", Operation.VERIFY),
    ("POST", "/v1/trusted-keys", "trust.add", Operation.TRUST),
    ("GET", "/v1/trusted-keys", "trust.list", Operation.LIST),
    ("POST", "/v1/trusted-keys/{tenant}/{kid}/retire", "trust.retire", Operation.TRUST),
)

_ENVELOPE = set(FEEDBACK_FIELDS)


class Host(Protocol):
    """What the federation needs of the server: its key service."""

    @property
    def keys(self) -> KeyService: ...


class RouteHost(Protocol):
    """Where the federation's routes are served (the server)."""

    def add_routes(self, routes: Iterable[tuple[str, str, Handler, Operation]]) -> None: ...


def attach(server: RouteHost, federation: Federation) -> None:
    """Serve ``federation``'s endpoints on ``server``."""
    server.add_routes(federation.routes())


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
        self.keys = host.keys
        self.settings = settings
        self.store = store
        self.trusted = trusted
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        #: held around trusted-key changes (the workers' cross-process admin lock)
        self.admin_guard = admin_guard
        self.trust = TrustRoutes(self.keys, settings, trusted, self._admin, max_body_bytes)

    def reconfigure(self, settings: FederationSettings) -> None:
        """A reload: new limits, skew, trusted keys; the nonce store stays (``check_reload``)."""
        self.settings = self.trust.settings = settings
        self.trusted.reconfigure(settings.trusted, allow_shared=settings.allow_shared_keys)

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
                max_entries=settings.max_entries,
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

    def routes(self) -> list[tuple[str, str, Handler, Operation]]:
        """The federation's routes, for the server's ``add_routes``."""
        return [(m, p, operator.attrgetter(name)(self), op) for m, p, name, op in ROUTES]

    async def close(self) -> None:
        """Close the nonce store (the daemon, when it stops)."""
        await self.store.close()

    # --- helpers -------------------------------------------------------------------

    async def _body(
        self, ctx: RequestContext, allowed: set[str], required: set[str], depth: int
    ) -> dict[str, Any]:
        return ctx.json(allowed, required, depth=depth, max_bytes=self.max_body_bytes)

    def _canonical_data(self, data: Any) -> bytes:
        check_json(data, self.settings.max_depth)
        out = canonicalize(data)
        if len(out) > self.settings.max_json_bytes:
            raise PayloadTooLarge(f"canonical data over {self.settings.max_json_bytes} bytes")
        return out

    def _own_key_known(self, key: KeyName) -> bool:
        return any(parse_kid(v.kid)[0] == key for v in self.keys.published(key.tenant))

    async def _active_kid(self, key: KeyName) -> str:
        for version in self.keys.published(key.tenant):
            if version.state is VersionState.ACTIVE and parse_kid(version.kid)[0] == key:
                return version.kid
        active = (await self.keys.describe(key)).active
        if active is None:
            raise BackendUnavailable("the key has no active version")
        return active.kid

    # --- telemetry -------------------------------------------------------------------

    async def telemetry_sign(self, ctx: RequestContext) -> Response:
        audit = ctx.notes
        body = await self._body(ctx, {"key", "body"}, {"key", "body"}, 2)
        key = KeyName.parse(body["key"])
        payload = b64decode(body, "body")
        timestamp = str(int(self.clock()))
        nonce = b64url(os.urandom(MIN_NONCE_BYTES))
        message = telemetry_input(timestamp, nonce, payload)
        audit.hashes = (sha256_hex(message),)
        ctx.authorize(Operation.SIGN, key.tenant, key)
        kid, signature = await self.keys.sign(key, message, ctx.sign_intent)
        audit.kid = kid
        await ctx.durable()  # the intent record: written while the token signed
        signed = {"kid": kid, "timestamp": timestamp, "nonce": nonce}
        return json_response({**signed, "signature": b64encode(signature), "tenant": key.tenant})

    async def telemetry_verify(self, ctx: RequestContext) -> Response:
        fields = {"tenant", "kid", "timestamp", "nonce", "body", "signature"}
        body = await self._body(ctx, fields | {"attestation"}, fields, 2)
        tenant = check_tenant(body["tenant"])
        kid = peer_kid(body["kid"])
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

        return await self._verify(ctx, tenant, kid, message, signature, signed, nonce, step6)

    # --- feedback -----------------------------------------------------------------------

    async def feedback_sign(self, ctx: RequestContext) -> Response:
        audit = ctx.notes
        depth = self.settings.max_depth + 1
        body = await self._body(ctx, {"key", "schema", "data"}, {"key", "schema", "data"}, depth)
        key = KeyName.parse(body["key"])
        schema = check_schema(body["schema"])
        data = body["data"]
        canonical_data = self._canonical_data(data)
        ctx.authorize(Operation.SIGN, key.tenant, key)
        signed_at = str(int(self.clock()))
        nonce = b64url(os.urandom(MIN_NONCE_BYTES))
        kid = await self._active_kid(key)
        for _ in range(3):  # the active version may change under us: sign again with the new kid
            message = feedback_input(key.tenant, signed_at, nonce, schema, kid, canonical_data)
            audit.hashes = (sha256_hex(message),)
            used, signature = await self.keys.sign(key, message, ctx.sign_intent)
            audit.kid = used
            await ctx.durable()  # the intent records: written while the token signed
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

    async def feedback_verify(self, ctx: RequestContext) -> Response:
        depth = self.settings.max_depth + 2
        body = await self._body(
            ctx, {"envelope", "schema", "attestation"}, {"envelope", "schema"}, depth
        )
        envelope = body["envelope"]
        if not isinstance(envelope, dict):
            raise InvalidRequest("field 'envelope' must be an object")
        envelope = check_fields(envelope, _ENVELOPE, _ENVELOPE, "envelope")
        expected_schema = check_schema(body["schema"])
        expected = check_attestation(body["attestation"]) if "attestation" in body else None
        tenant = check_tenant(envelope["tenant"])
        signed_at = envelope["signed_at"]
        signed = check_timestamp(signed_at, "envelope.signed_at")
        nonce = check_nonce(envelope["nonce"])
        schema = check_schema(envelope["schema"], "envelope.schema")
        kid = peer_kid(envelope["kid"])
        signature = b64decode(envelope, "signature")
        data = envelope["data"]
        message = feedback_input(tenant, signed_at, nonce, schema, kid, self._canonical_data(data))

        def step6() -> None:
            if schema != expected_schema:
                raise SchemaMismatch()
            if expected is not None and attestation_of_data(data) != expected:
                raise AttestationMismatch()

        return await self._verify(ctx, tenant, kid, message, signature, signed, nonce, step6)

    # --- the verification -------------------------------------------------------------

    async def _verify(
        self,
        ctx: RequestContext,
        tenant: str,
        kid: str,
        message: bytes,
        signature: bytes,
        signed: int,
        nonce: str,
        step6: Callable[[], None],
    ) -> Response:
        audit = ctx.notes
        audit.tenant, audit.kid, audit.hashes = tenant, kid, (sha256_hex(message),)
        resolved = await self._resolve(tenant, kid)  # 2
        if resolved.tenant != tenant:  # 3
            raise TenantMismatch()
        ctx.authorize(Operation.VERIFY, tenant, resolved.key)
        if resolved.verifier is None:  # 4
            await self.keys.verify(kid, message, signature)
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
        own = own_kid(kid)
        if own is not None:
            try:
                key, version = await self.keys.lookup_kid(kid)
                return _Resolved(key.tenant, key, None, version.public_key)
            except UnknownKid:
                if self._own_key_known(own):
                    raise  # a kid of one of our keys never resolves to a peer key
        peer, verifier = self.trusted.lookup(tenant, kid)
        return _Resolved(peer.tenant, None, verifier, peer.public)
