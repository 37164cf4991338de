"""The producer's side: sign telemetry through signerd, verify the gateway's feedback locally.

``Producer.sign_telemetry`` asks signerd for a telemetry signature and
returns the envelope as request headers. ``Producer.verify_feedback``
verifies a feedback envelope in-process, with the public key looked up by
kid (``TrustedPeerKeys``, the default: the gateway's keys as trusted in the
producer's signerd, cached like the client's JWKS; ``SignerdKeys``: signerd's
own keys when both ends share one signerd; ``StaticKeys``: JWKs given at
start), running the same checks as signerd's
``/v1/feedback/verify`` in the same order, with the same rules
(``signerd.wire``: the envelope grammar and strict JSON, one copy for both):

1. parse and bound the envelope (unknown or missing fields, patterns,
   JSON that cannot be canonicalised without ambiguity, such as a number
   beyond 2**53 - 1 however written or one that does not round-trip through a double,
   nesting deeper than ``max_depth``);
2. look up the kid (``unknown_kid``);
3. the kid's tenant and the envelope's tenant are the producer's
   (``tenant_mismatch``);
4. the signature over ``tenant|signed_at|nonce|schema|kid|canonical_data``
   (``invalid_signature``);
5. ``signed_at`` within ``max_skew`` seconds of now, either way
   (``stale_timestamp``);
6. the expected schema (``schema_mismatch``) and, when asked, the
   attestation hash inside ``data`` (``attestation_mismatch``);
7. the nonce, recorded only now, scoped by the public key that verified it
   (its RFC 7638 thumbprint, as in signerd's stores) (``replayed_nonce``).

Replay protection on this side needs its own nonce memory: signerd's store
is not consulted by a local verify. ``NonceMemory`` is a bounded, expiring,
in-process one (see its notes on restarts); pass one shared memory to every
``Producer`` of a process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature as _BadSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..client import AsyncClient, KeyCache
from ..errors import (
    AttestationMismatch,
    InvalidRequest,
    InvalidSignature,
    SchemaMismatch,
    StaleTimestamp,
    TenantMismatch,
    UnknownKid,
)
from ..wire import (
    ATTESTATION_MEMBER,
    ATTESTATION_RE,
    DEFAULT_MAX_DEPTH,
    FEEDBACK_FIELDS,
    KeyName,
    b64decode,
    check_kid,
    check_nonce,
    check_schema,
    check_tenant,
    check_timestamp,
    feedback_input,
    from_jwk,
    parse_json,
    parse_kid,
    thumbprint,
)
from ..wire import canonical_data as _canonical_data
from ._headers import TelemetryEnvelope, TelemetryHeaders
from ._nonces import NonceMemory

__all__ = [
    "KeySource",
    "Producer",
    "SignerdKeys",
    "StaticKeys",
    "TrustedPeerKeys",
    "VerifiedFeedback",
    "canonical_data",
    "feedback_signing_input",
]


class KeySource(Protocol):
    """Where a verifier finds the public key of a kid, and the tenant the kid belongs to."""

    async def resolve(self, kid: str) -> tuple[str, Ed25519PublicKey]: ...


class SignerdKeys:
    """signerd's own kids (``TENANT.NAME.vN``), from the client's JWKS cache."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def resolve(self, kid: str) -> tuple[str, Ed25519PublicKey]:
        tenant = parse_kid(kid)[0].tenant  # UnknownKid when malformed
        return tenant, await self._client.public_key(kid)


class TrustedPeerKeys:
    """A peer's kids as trusted in signerd (``GET /v1/trusted-keys?tenant=T``), cached.

    The cache is the client's JWKS cache (the one behind ``verify_local``):
    refreshed when older than the client's ``jwks_ttl``, and once on a kid it
    does not hold (at most once per ``jwks_refetch_interval``), so a retired
    peer key stops verifying locally within ``jwks_ttl``. Listing needs the
    ``list`` operation on the tenant.
    """

    def __init__(self, client: AsyncClient, tenant: str) -> None:
        self._client = client
        self._tenant = tenant
        self._cache = KeyCache(client.jwks_ttl, client.jwks_refetch_interval)

    async def resolve(self, kid: str) -> tuple[str, Ed25519PublicKey]:
        public, fetch = self._cache.lookup(self._tenant, kid)
        if fetch:
            listed = await self._client.trusted_keys(self._tenant)
            active = [k.jwk for k in listed if k.state == "active" and k.tenant == self._tenant]
            self._cache.replace(self._tenant, active)
            public = self._cache.get(self._tenant, kid)
        if public is None:
            raise UnknownKid()
        return self._tenant, public


class StaticKeys:
    """Kids pinned at start: ``{tenant: [RFC 8037 JWK, ...]}`` (e.g. a peer's published keys).

    ValueError for a JWK that is not Ed25519, or whose key is a small-order or
    non-canonical point."""

    def __init__(self, jwks: Mapping[str, Iterable[Mapping[str, Any]]]) -> None:
        self._keys: dict[str, tuple[str, Ed25519PublicKey]] = {}
        for tenant, keys in jwks.items():
            for jwk in keys:
                kid, public = from_jwk(dict(jwk))
                self._keys[kid] = (tenant, public)

    async def resolve(self, kid: str) -> tuple[str, Ed25519PublicKey]:
        found = self._keys.get(kid)
        if found is None:
            raise UnknownKid()
        return found


@dataclass(frozen=True)
class VerifiedFeedback:
    """A feedback envelope that passed every check."""

    tenant: str
    kid: str
    schema: str
    signed_at: int
    nonce: str
    data: Any


def canonical_data(data: Any, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """RFC 8785 form of ``data``; MalformedJson when it cannot be canonicalised unambiguously
    (``signerd.wire``'s rules, the ones signerd's ``/v1/feedback/verify`` applies)."""
    return _canonical_data(data, max_depth)


def feedback_signing_input(
    tenant: str, signed_at: int | str, nonce: str, schema: str, kid: str, canonical: bytes
) -> bytes:
    """``tenant|signed_at|nonce|schema|kid|canonical`` (``signerd.wire.feedback_input``)."""
    return feedback_input(tenant, str(signed_at), nonce, schema, kid, canonical)


@dataclass(frozen=True)
class _Parsed:
    tenant: str
    signed_at: int
    nonce: str
    schema: str
    kid: str
    data: Any
    signature: bytes
    signing_input: bytes


def _parse(envelope: bytes | Mapping[str, Any], max_depth: int) -> _Parsed:
    doc: Any
    if isinstance(envelope, bytes):  # the envelope object is one level above its data
        doc = parse_json(envelope, max_bytes=len(envelope), max_depth=max_depth + 1)
    else:
        doc = envelope
    if not isinstance(doc, Mapping):
        raise InvalidRequest("feedback envelope must be a JSON object")
    if set(doc) != FEEDBACK_FIELDS:
        raise InvalidRequest("feedback envelope has unknown or missing fields")
    tenant = check_tenant(doc["tenant"])
    signed_at = check_timestamp(doc["signed_at"], "envelope.signed_at")
    nonce = check_nonce(doc["nonce"])
    schema = check_schema(doc["schema"], "envelope.schema")
    kid = check_kid(doc["kid"])
    signature = b64decode(doc, "signature")
    canonical = _canonical_data(doc["data"], max_depth)
    signing_input = feedback_input(tenant, doc["signed_at"], nonce, schema, kid, canonical)
    return _Parsed(tenant, signed_at, nonce, schema, kid, doc["data"], signature, signing_input)


class Producer:
    """Signs telemetry with ``key`` (``TENANT/NAME``) and verifies feedback for its tenant."""

    def __init__(
        self,
        client: AsyncClient,
        key: str,
        *,
        keys: KeySource | None = None,
        nonces: NonceMemory | None = None,
        headers: TelemetryHeaders | None = None,
        max_skew: int = 300,
        max_depth: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.key = key
        self.tenant = KeyName.parse(key).tenant
        self.keys: KeySource = keys if keys is not None else TrustedPeerKeys(client, self.tenant)
        self.nonces = nonces if nonces is not None else NonceMemory(ttl=2.0 * max_skew)
        if self.nonces.ttl < 2 * max_skew:
            raise ValueError("the nonce memory's ttl must be at least twice max_skew")
        self.headers = headers or TelemetryHeaders()
        self.max_skew = max_skew
        self.max_depth = max_depth
        self._clock = clock

    async def sign_telemetry(self, body: bytes, *, timeout: float | None = None) -> dict[str, str]:
        """The envelope headers for ``body`` (send the body unchanged)."""
        sig = await self.client.telemetry_sign(self.key, body, timeout=timeout)
        envelope = TelemetryEnvelope(self.tenant, sig.kid, sig.timestamp, sig.nonce, sig.signature)
        return envelope.as_headers(self.headers)

    async def verify_feedback(
        self,
        envelope: bytes | Mapping[str, Any],
        *,
        schema: str,
        attestation: str | None = None,
    ) -> VerifiedFeedback:
        """Return only for valid, fresh, first-seen feedback; raise the check's error otherwise.

        Pass the raw response body (bytes) when you have it: it is parsed
        strictly (duplicate members, NaN, and numbers whose text does not
        round-trip through a double, like ``0.10000000000000001``, are
        refused), which an already-parsed mapping can no longer show.
        """
        if attestation is not None and not ATTESTATION_RE.fullmatch(attestation):
            raise ValueError("attestation must be 'sha256:' and 64 lower-case hex digits")
        env = _parse(envelope, self.max_depth)  # 1
        key_tenant, public = await self.keys.resolve(env.kid)  # 2
        if key_tenant != env.tenant or env.tenant != self.tenant:  # 3
            raise TenantMismatch()
        try:  # 4
            public.verify(env.signature, env.signing_input)
        except _BadSignature:
            raise InvalidSignature() from None
        if abs(self._clock() - env.signed_at) > self.max_skew:  # 5
            raise StaleTimestamp()
        if env.schema != schema:  # 6
            raise SchemaMismatch()
        if attestation is not None and not (
            isinstance(env.data, dict) and env.data.get(ATTESTATION_MEMBER) == attestation
        ):
            raise AttestationMismatch()
        self.nonces.record(thumbprint(public.public_bytes_raw()), env.nonce)  # 7
        return VerifiedFeedback(env.tenant, env.kid, env.schema, env.signed_at, env.nonce, env.data)
