"""Python clients for signerd: ``Client`` (sync, standard library) and ``AsyncClient`` (aiohttp).

Both speak the v1 wire protocol (``docs/protocol.md``) over the daemon's Unix
socket with keep-alive connections, take a timeout per call (the client's
default, or ``timeout=`` on any method), and return frozen dataclasses::

    with Client("/run/signerd/signerd.sock") as signer:
        sig = signer.sign("acme/feedback", payload)   # Signature(kid, signature)
        signer.verify(sig.kid, payload, sig.signature)  # raises unless valid

Errors are the classes of ``signerd.errors``:

- an error answer from the daemon raises the class of its wire code
  (``error_for_code``), with the daemon's message and ``request_id``;
- ``ConnectionFailed`` (a ``BackendUnavailable``, so retryable): the socket
  cannot be reached or the connection broke mid-call; ``RequestTimeout``
  (a ``ConnectionFailed``): no complete answer within the timeout. Neither
  is a wire code; their ``code`` stays ``backend_unavailable``;
- an answer outside the protocol raises ``InternalError``.

Verification fails closed: ``verify`` and ``verify_local`` return only for a
valid signature, and raise ``InvalidSignature``, ``UnknownKid``,
``RetiredKid`` or ``DestroyedKid`` (all ``VerificationError``) otherwise.

Reads, ``sign`` and ``verify`` are sent a second time, once, when a reused
idle connection turns out to be broken. Create, rotate, promote, retire,
destroy and the trusted-key changes carry an ``Idempotency-Key`` made for
the call: when the connection breaks after sending, the call times out, or
signerd answers ``outcome_unknown``, the same request is sent again with the
same key (three times in all; once in doubt, also after a retryable refusal
such as the admin lock being busy), and signerd answers what the first one
did rather than doing it twice. When the outcome is still in doubt after the
third, the call raises ``OutcomeUnknown`` (its cause is the last failure).

The federation envelopes (``docs/federation.md``) have their own calls:
``telemetry_sign``/``telemetry_verify``, ``feedback_sign``/``feedback_verify``
(a verify returns only for an accepted envelope, whose nonce is then spent),
and ``trust_key``/``trusted_keys``/``retire_trusted_key`` for peer keys;
``signerd.gateway`` builds a gateway and a producer on them.

``verify_local`` checks signatures in-process against public keys from
``/v1/jwks?tenant=T`` (the tenant is part of the kid), cached per tenant:

- the tenant's JWKS is fetched on first use and again when older than
  ``jwks_ttl`` seconds, so a retired kid stops verifying locally within
  ``jwks_ttl``;
- a kid that is not in the cache fetches the JWKS again, once (at most once
  per ``jwks_refetch_interval`` per tenant, so a stream of made-up kids
  cannot make the daemon serve a JWKS per message);
- the JWKS lists only pending, active and verify-only versions, so a kid
  still missing is looked up with ``/v1/kids/{kid}``: one small request that
  raises ``UnknownKid`` for a kid signerd does not know and ``RetiredKid`` or
  ``DestroyedKid`` for those states, exactly as the daemon's own verify does,
  and that supplies the key of a version published since the last fetch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..backends import VersionState
from ..errors import SignerdError
from ..wire._names import parse_kid
from ._federation import (
    FeedbackEnvelope,
    FeedbackVerified,
    TelemetrySignature,
    TelemetryVerified,
    TrustedKey,
    op_feedback_sign,
    op_feedback_verify,
    op_telemetry_sign,
    op_telemetry_verify,
    op_trust_add,
    op_trust_list,
    op_trust_retire,
)
from ._http import (
    DEFAULT_TIMEOUT,
    AsyncTransport,
    ConnectionFailed,
    KeyDescription,
    KeyVersion,
    KidInfo,
    Op,
    RequestTimeout,
    Signature,
    SyncTransport,
    VerifyResult,
    default_socket_path,
    op_create,
    op_get_key,
    op_jwks,
    op_kid,
    op_list,
    op_rotate,
    op_sign,
    op_sign_batch,
    op_status,
    op_verify,
    op_version,
)
from ._keycache import KeyCache, check

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionFailed",
    "FeedbackEnvelope",
    "FeedbackVerified",
    "KeyDescription",
    "KeyVersion",
    "KidInfo",
    "RequestTimeout",
    "Signature",
    "TelemetrySignature",
    "TelemetryVerified",
    "TrustedKey",
    "VerifyResult",
    "VersionState",
    "default_socket_path",
]

T = TypeVar("T")


# --- the clients ---


class Client:
    """Sync signerd client. Thread-safe: each concurrent call uses its own pooled connection.

    ``close()`` closes the idle connections; the client stays usable.
    """

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
        self._transport = SyncTransport(self.socket_path)
        self._cache = KeyCache(jwks_ttl, jwks_refetch_interval)

    def _run(self, op: Op[T], timeout: float | None) -> T:
        return self._transport.run(op, self.timeout if timeout is None else timeout)

    def create_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        """Create ``TENANT/NAME`` with version 1 active."""
        return self._run(op_create(key), timeout)

    def list_keys(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[KeyDescription]:
        return self._run(op_list(tenant), timeout)

    def get_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        return self._run(op_get_key(key), timeout)

    def rotate(
        self, key: str, pending: bool = False, *, timeout: float | None = None
    ) -> tuple[str, KeyDescription]:
        """Add the next version (active, or pending when ``pending``); return its kid."""
        return self._run(op_rotate(key, pending), timeout)

    def promote(self, key: str, version: int, *, timeout: float | None = None) -> KeyDescription:
        return self._run(op_version(key, version, "promote", {}), timeout)

    def retire(self, key: str, version: int, *, timeout: float | None = None) -> KeyDescription:
        return self._run(op_version(key, version, "retire", {}), timeout)

    def destroy(
        self, key: str, version: int, confirm: str, *, timeout: float | None = None
    ) -> KeyDescription:
        """Remove a retired version's private key for good; ``confirm`` must be its kid."""
        return self._run(op_version(key, version, "destroy", {"confirm": confirm}), timeout)

    def sign(self, key: str, data: bytes, *, timeout: float | None = None) -> Signature:
        return self._run(op_sign(key, data), timeout)

    def sign_batch(
        self, items: Sequence[tuple[str, bytes]], *, timeout: float | None = None
    ) -> list[Signature | SignerdError]:
        """Sign (key, data) pairs in one request; a failed item is its error, in place."""
        if not items:
            return []
        return self._run(op_sign_batch(items), timeout)

    def verify(
        self, kid: str, data: bytes, signature: bytes, *, timeout: float | None = None
    ) -> VerifyResult:
        """Return only for a valid signature; raise a VerificationError otherwise."""
        return self._run(op_verify(kid, data, signature), timeout)

    def jwks(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, str]]:
        return self._run(op_jwks(tenant), timeout)

    def kid_info(self, kid: str, *, timeout: float | None = None) -> KidInfo:
        return self._run(op_kid(kid), timeout)

    def health(self, *, timeout: float | None = None) -> str:
        return self._run(op_status("/v1/health"), timeout)

    def ready(self, *, timeout: float | None = None) -> str:
        """``"ready"``, or raises BackendUnavailable when the token is not usable."""
        return self._run(op_status("/v1/ready"), timeout)

    # --- federation envelopes (docs/federation.md) ---

    def telemetry_sign(
        self, key: str, body: bytes, *, timeout: float | None = None
    ) -> TelemetrySignature:
        """Sign ``timestamp.nonce.body``; signerd picks the timestamp and the nonce."""
        return self._run(op_telemetry_sign(key, body), timeout)

    def telemetry_verify(
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
        return self._run(op, timeout)

    def feedback_sign(
        self, key: str, schema: str, data: object, *, timeout: float | None = None
    ) -> FeedbackEnvelope:
        return self._run(op_feedback_sign(key, schema, data), timeout)

    def feedback_verify(
        self,
        envelope: FeedbackEnvelope | dict[str, object],
        schema: str,
        *,
        attestation: str | None = None,
        timeout: float | None = None,
    ) -> FeedbackVerified:
        """Return only for fresh, valid feedback of ``schema`` (its nonce is then spent)."""
        return self._run(op_feedback_verify(envelope, schema, attestation), timeout)

    def trust_key(
        self, tenant: str, kid: str, jwk: dict[str, str], *, timeout: float | None = None
    ) -> TrustedKey:
        """Trust a peer's public key (RFC 8037 JWK) under the peer's ``kid`` for ``tenant``."""
        return self._run(op_trust_add(tenant, kid, jwk), timeout)

    def trusted_keys(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[TrustedKey]:
        return self._run(op_trust_list(tenant), timeout)

    def retire_trusted_key(
        self, tenant: str, kid: str, *, timeout: float | None = None
    ) -> TrustedKey:
        return self._run(op_trust_retire(tenant, kid), timeout)

    def public_key(self, kid: str, *, timeout: float | None = None) -> Ed25519PublicKey:
        """The public key of one of signerd's kids, from the JWKS cache behind ``verify_local``."""
        tenant = parse_kid(kid)[0].tenant
        public, fetch = self._cache.lookup(tenant, kid)
        if fetch:
            self._cache.replace(tenant, self.jwks(tenant, timeout=timeout))
            public = self._cache.get(tenant, kid)
        if public is None:
            public = self._cache.admit(tenant, self.kid_info(kid, timeout=timeout))
        return public

    def verify_local(
        self, kid: str, data: bytes, signature: bytes, *, timeout: float | None = None
    ) -> None:
        """Verify in-process from the cached JWKS; raise a VerificationError unless valid."""
        check(self.public_key(kid, timeout=timeout), data, signature)

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


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

    async def create_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        return await self._run(op_create(key), timeout)

    async def list_keys(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[KeyDescription]:
        return await self._run(op_list(tenant), timeout)

    async def get_key(self, key: str, *, timeout: float | None = None) -> KeyDescription:
        return await self._run(op_get_key(key), timeout)

    async def rotate(
        self, key: str, pending: bool = False, *, timeout: float | None = None
    ) -> tuple[str, KeyDescription]:
        return await self._run(op_rotate(key, pending), timeout)

    async def promote(
        self, key: str, version: int, *, timeout: float | None = None
    ) -> KeyDescription:
        return await self._run(op_version(key, version, "promote", {}), timeout)

    async def retire(
        self, key: str, version: int, *, timeout: float | None = None
    ) -> KeyDescription:
        return await self._run(op_version(key, version, "retire", {}), timeout)

    async def destroy(
        self, key: str, version: int, confirm: str, *, timeout: float | None = None
    ) -> KeyDescription:
        return await self._run(op_version(key, version, "destroy", {"confirm": confirm}), timeout)

    async def sign(self, key: str, data: bytes, *, timeout: float | None = None) -> Signature:
        return await self._run(op_sign(key, data), timeout)

    async def sign_batch(
        self, items: Sequence[tuple[str, bytes]], *, timeout: float | None = None
    ) -> list[Signature | SignerdError]:
        if not items:
            return []
        return await self._run(op_sign_batch(items), timeout)

    async def verify(
        self, kid: str, data: bytes, signature: bytes, *, timeout: float | None = None
    ) -> VerifyResult:
        return await self._run(op_verify(kid, data, signature), timeout)

    async def jwks(
        self, tenant: str | None = None, *, timeout: float | None = None
    ) -> list[dict[str, str]]:
        return await self._run(op_jwks(tenant), timeout)

    async def kid_info(self, kid: str, *, timeout: float | None = None) -> KidInfo:
        return await self._run(op_kid(kid), timeout)

    async def health(self, *, timeout: float | None = None) -> str:
        return await self._run(op_status("/v1/health"), timeout)

    async def ready(self, *, timeout: float | None = None) -> str:
        return await self._run(op_status("/v1/ready"), timeout)

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
        return await self._run(op_trust_list(tenant), timeout)

    async def retire_trusted_key(
        self, tenant: str, kid: str, *, timeout: float | None = None
    ) -> TrustedKey:
        return await self._run(op_trust_retire(tenant, kid), timeout)

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
