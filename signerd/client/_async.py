"""``AsyncClient``: the v1 API as coroutines, on aiohttp (see ``signerd.client``).

This file is the source of both clients: ``_sync.py`` (``Client``) is generated
from it by ``python signerd/client/_unasync.py``, and a test checks that the
committed file is current. Each method names its ``Op`` (``_ops``) and hands
it to the transport, so the request and the answer's parsing live in one place.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import InternalError, SignerdError
from ..wire import parse_kid
from ._keycache import KeyCache, check
from ._ops import (
    Op,
    op_create,
    op_feedback_sign,
    op_feedback_verify,
    op_get_key,
    op_jwks,
    op_kid,
    op_list,
    op_rotate,
    op_sign,
    op_sign_batch,
    op_status,
    op_telemetry_sign,
    op_telemetry_verify,
    op_verify,
    op_version,
)
from ._results import (
    FeedbackEnvelope,
    FeedbackVerified,
    KeyDescription,
    KidInfo,
    Signature,
    TelemetrySignature,
    TelemetryVerified,
    TrustedKey,
    VerifyResult,
)
from ._transport import DEFAULT_TIMEOUT, AsyncTransport, default_socket_path
from ._trust_ops import op_trust_add, op_trust_list, op_trust_retire
from ._whoami import op_whoami

T = TypeVar("T")


def _document(doc: Any, _rid: str | None = None) -> dict[str, Any]:
    """An answer's JSON object, as it is."""
    if not isinstance(doc, dict):
        raise InternalError("answer outside the protocol: not an object")
    return doc


class AsyncClient:
    """The same API as ``Client``, awaitable, on aiohttp. Use as ``async with AsyncClient(...)``."""

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        jwks_ttl: float = 300.0,
        jwks_refetch_interval: float = 1.0,
    ) -> None:
        self.socket_path = (
            os.fspath(socket_path) if socket_path is not None else default_socket_path()
        )
        self.timeout = timeout
        self.jwks_ttl = jwks_ttl
        self.jwks_refetch_interval = jwks_refetch_interval
        self._transport = AsyncTransport(self.socket_path)
        self._cache = KeyCache(jwks_ttl, jwks_refetch_interval)

    async def _run(self, op: Op[T], timeout: float | None) -> T:
        return await self._transport.run(op, self.timeout if timeout is None else timeout)

    # --- keys and versions ---

    async def create_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        """Create ``TENANT/NAME`` with version 1 active."""
        return await self._run(op_create(key), timeout)

    async def list_keys(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[KeyDescription]:
        """The keys, all of them or those of ``tenant``, each with its versions."""
        return await self._run(op_list(tenant), timeout)

    async def get_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        """One key: its versions, their states, and its active kid."""
        return await self._run(op_get_key(key), timeout)

    async def rotate(
        self, key: str, pending: bool = False, *, timeout: float | None = None
    ) -> tuple[str, KeyDescription]:
        """Add the next version (active, or pending when ``pending``); return its kid."""
        return await self._run(op_rotate(key, pending), timeout)

    async def promote(
        self, key: str, version: int, *, timeout: float | None = None
    ) -> KeyDescription:
        """Make a pending version active; the version active until then turns verify-only."""
        return await self._run(op_version(key, version, "promote", {}), timeout)

    async def retire(
        self, key: str, version: int, *, timeout: float | None = None
    ) -> KeyDescription:
        """Retire a pending or verify-only version: verify refuses its kid; its key is kept."""
        return await self._run(op_version(key, version, "retire", {}), timeout)

    async def destroy(
        self,
        key: str,
        version: int,
        confirm: str | None = None,
        *,
        now: bool = False,
        timeout: float | None = None,
    ) -> KeyDescription:
        """Schedule a retired version's deletion (``pending_deletion``; the daemon destroys
        it after ``keys.deletion_wait``). ``now=True``: remove a retired or pending_deletion
        version's private key for good at once; ``confirm`` must then be its kid."""
        body: dict[str, Any] = {} if confirm is None else {"confirm": confirm}
        if now:
            body["now"] = True
        return await self._run(op_version(key, version, "destroy", body), timeout)

    async def cancel_deletion(
        self, key: str, version: int, *, timeout: float | None = None
    ) -> KeyDescription:
        """Put a version pending deletion back to retired."""
        return await self._run(op_version(key, version, "cancel-deletion", {}), timeout)

    # --- signatures and public keys ---

    async def sign(self, key: str, data: bytes, *, timeout: float | None = None) -> Signature:
        """Sign ``data`` with the key's active version; the result names that version's kid."""
        return await self._run(op_sign(key, data), timeout)

    async def sign_batch(
        self, items: Sequence[tuple[str, bytes]], *, timeout: float | None = None
    ) -> list[Signature | SignerdError]:
        """Sign (key, data) pairs in one request; a failed item is its error, in place."""
        if not items:
            return []
        return await self._run(op_sign_batch(items), timeout)

    async def verify(
        self, kid: str, data: bytes, signature: bytes, *, timeout: float | None = None
    ) -> VerifyResult:
        """Return only for a valid signature; raise a VerificationError otherwise."""
        return await self._run(op_verify(kid, data, signature), timeout)

    async def jwks(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, str]]:
        """RFC 8037 JWKs of the pending, active and verify-only versions (of ``tenant``)."""
        return await self._run(op_jwks(tenant), timeout)

    async def kid_info(self, kid: str, *, timeout: float | None = None) -> KidInfo:
        """What signerd knows of one kid, in any state; UnknownKid when it knows nothing."""
        return await self._run(op_kid(kid), timeout)

    async def health(self, *, timeout: float | None = None) -> str:
        """``"ok"`` whenever signerd answers, whether or not its keys are usable."""
        return await self._run(op_status("/v1/health"), timeout)

    async def ready(self, *, timeout: float | None = None) -> str:
        """``"ready"``, or raises BackendUnavailable when the token is not usable."""
        return await self._run(op_status("/v1/ready"), timeout)

    async def whoami(self, *, timeout: float | None = None) -> dict[str, Any]:
        """How signerd sees this caller: its peer credentials (``peer``) and the policy
        rules that match it (``rules``, in the order the policy tries them)."""
        return await self._run(op_whoami(), timeout)

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The daemon's state (``GET /v1/status``, the status operation): backends, keys with
        their rotation due dates, the audit trail, the nonce store, workers (docs/metrics.md)."""
        return await self._run(Op("GET", "/v1/status", None, _document, True), timeout)

    # --- federation envelopes (docs/federation.md) ---

    async def telemetry_sign(
        self, key: str, body: bytes, *, timeout: float | None = None
    ) -> TelemetrySignature:
        """Sign ``timestamp.nonce.body``; signerd picks the timestamp and the nonce."""
        return await self._run(op_telemetry_sign(key, body), timeout)

    async def telemetry_verify(
        self,
        tenant: str,
        kid: str,
        timestamp: int | str,
        nonce: str,
        body: bytes,
        signature: bytes,
        *,
        attestation: str | None = None,
        timeout: float | None = None,
    ) -> TelemetryVerified:
        """Return only for fresh, valid telemetry of ``tenant`` (its nonce is then spent)."""
        op = op_telemetry_verify(tenant, kid, timestamp, nonce, body, signature, attestation)
        return await self._run(op, timeout)

    async def feedback_sign(
        self, key: str, schema: str, data: object, *, timeout: float | None = None
    ) -> FeedbackEnvelope:
        """Sign JSON ``data`` as feedback of ``schema``; signerd picks the time and the nonce."""
        return await self._run(op_feedback_sign(key, schema, data), timeout)

    async def feedback_verify(
        self,
        envelope: FeedbackEnvelope | dict[str, object],
        schema: str,
        *,
        attestation: str | None = None,
        timeout: float | None = None,
    ) -> FeedbackVerified:
        """Return only for fresh, valid feedback of ``schema`` (its nonce is then spent)."""
        return await self._run(op_feedback_verify(envelope, schema, attestation), timeout)

    async def trust_key(
        self, tenant: str, kid: str, jwk: dict[str, str], *, timeout: float | None = None
    ) -> TrustedKey:
        """Trust a peer's public key (RFC 8037 JWK) under the peer's ``kid`` for ``tenant``."""
        return await self._run(op_trust_add(tenant, kid, jwk), timeout)

    async def trusted_keys(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[TrustedKey]:
        """The trusted peer keys, active and retired, of every tenant or of ``tenant``."""
        return await self._run(op_trust_list(tenant), timeout)

    async def retire_trusted_key(
        self, tenant: str, kid: str, *, timeout: float | None = None
    ) -> TrustedKey:
        """Stop trusting a peer key: envelopes under its kid are refused from then on."""
        return await self._run(op_trust_retire(tenant, kid), timeout)

    # --- verifying in-process ---

    async def public_key(self, kid: str, *, timeout: float | None = None) -> Ed25519PublicKey:
        """The public key of one of signerd's kids, from the JWKS cache behind ``verify_local``."""
        tenant = parse_kid(kid)[0].tenant
        public, fetch = self._cache.lookup(tenant, kid)
        if fetch:
            self._cache.replace(tenant, await self.jwks(tenant, timeout=timeout))
            public = self._cache.get(tenant, kid)
        if public is None:
            public = self._cache.admit(tenant, await self.kid_info(kid, timeout=timeout))
        return public

    async def verify_local(
        self, kid: str, data: bytes, signature: bytes, *, timeout: float | None = None
    ) -> None:
        """Verify in-process from the cached JWKS; raise a VerificationError unless valid."""
        check(await self.public_key(kid, timeout=timeout), data, signature)

    async def close(self) -> None:
        """Close the idle connections; the client stays usable (a later call opens new ones)."""
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
