"""The public-key cache behind ``verify_local`` and the producer's key lookups (see ``client``)."""

from __future__ import annotations

import threading
import time

from cryptography.exceptions import InvalidSignature as _BadSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import DestroyedKid, InternalError, InvalidSignature, RetiredKid
from ..wire import VersionState, from_jwk
from ._results import KidInfo


class KeyCache:
    """Public keys per tenant from /v1/jwks, with fetch times; thread-safe."""

    def __init__(self, ttl: float, refetch_interval: float) -> None:
        self._ttl = ttl
        self._refetch_interval = refetch_interval
        self._keys: dict[str, dict[str, Ed25519PublicKey]] = {}
        self._fetched_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def lookup(self, tenant: str, kid: str) -> tuple[Ed25519PublicKey | None, bool]:
        """The cached key (None when absent, or when the tenant's JWKS is stale) and
        whether a fetch is due."""
        now = time.monotonic()
        with self._lock:
            fetched = self._fetched_at.get(tenant)
            if fetched is None or now - fetched >= self._ttl:
                return None, True
            key = self._keys[tenant].get(kid)
            return key, key is None and now - fetched >= self._refetch_interval

    def get(self, tenant: str, kid: str) -> Ed25519PublicKey | None:
        with self._lock:
            return self._keys.get(tenant, {}).get(kid)

    def replace(self, tenant: str, jwks: list[dict[str, str]]) -> None:
        keys: dict[str, Ed25519PublicKey] = {}
        for jwk in jwks:
            try:
                kid, public = from_jwk(jwk)
            except ValueError:
                continue
            keys[kid] = public
        with self._lock:
            self._keys[tenant] = keys
            self._fetched_at[tenant] = time.monotonic()

    def admit(self, tenant: str, info: KidInfo) -> Ed25519PublicKey:
        """The key of a kid the JWKS did not list, when its state still verifies."""
        if info.state in (VersionState.RETIRED, VersionState.PENDING_DELETION):
            raise RetiredKid()
        if info.state is VersionState.DESTROYED:
            raise DestroyedKid()
        try:
            kid, public = from_jwk(info.jwk)
        except ValueError:
            raise InternalError("answer outside the protocol: jwk") from None
        if kid != info.kid:
            raise InternalError("answer outside the protocol: jwk kid")
        with self._lock:
            self._keys.setdefault(tenant, {})[kid] = public
        return public


def check(public: Ed25519PublicKey, data: bytes, signature: bytes) -> None:
    try:
        public.verify(signature, data)
    except _BadSignature:
        raise InvalidSignature() from None
