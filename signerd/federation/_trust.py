"""Trusted peer keys: the producers' public keys, per tenant, by the producer's kid.

Two sources: the configuration (``[[federation.trusted_keys]]``, from a JWK or
PEM file) and the admin API (``POST /v1/trusted-keys``), which persists to
``trusted-keys.json`` in the state directory (written to a temporary file,
fsynced, renamed over, directory fsynced: a crash leaves the old or the new
file, never a torn one). Retiring a key is recorded in the same file and wins
over the configuration, so a retired key stays retired across restarts.

A peer key verifies only for its own tenant: the same kid string may be
trusted for two tenants with two different keys. One public key, though,
belongs to one tenant: trusting it for a second tenant is refused
(``shared_peer_key``) unless ``federation.allow_shared_keys`` is on, and when
the key is trusted for several tenants anyway (the configuration and the file
disagree, or the option was turned off later) it verifies for none of them.
The same key under a second kid of the same tenant is allowed: nonces are
unique per public key, so an envelope accepted under one kid is a replay
under the other. Peer kids match
``[A-Za-z0-9._:-]{1,128}`` (no ``|``, no ``/``). They never shadow signerd's
own kids: a kid of a key this signerd holds always resolves to that key, and
adding a peer kid that names one of signerd's own keys is refused (see
``routes``). Every public key is checked (``_ed25519.check_public``):
small-order and non-canonical points are refused wherever they come from.
Every lookup checks whether the file changed (one ``stat``), so
several processes sharing the state directory see each other's changes.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..errors import (
    BackendUnavailable,
    InvalidRequest,
    InvalidState,
    KeyExists,
    RetiredKid,
    SharedPeerKey,
    TenantMismatch,
    UnknownKey,
    UnknownKid,
)
from ..wire import (
    DEFAULT_JWK_ALG,
    JWK_ALGS,
    b64url,
    check_public,
    to_jwk,
    valid_peer_kid,
    weakness,
)

__all__ = ["PeerKey", "TrustedKeys", "jwk_public", "pem_public", "valid_peer_kid"]

_JWK_MEMBERS = frozenset({"kty", "crv", "x", "kid", "alg", "use", "key_ops"})
FILE_NAME = "trusted-keys.json"
log = logging.getLogger("signerd.federation.trust")


def jwk_public(jwk: object, kid: str) -> bytes:
    """The raw 32-byte key of an RFC 8037 OKP Ed25519 public JWK; InvalidRequest otherwise."""
    if not isinstance(jwk, dict):
        raise InvalidRequest("field 'jwk' must be an object")
    if "d" in jwk:
        raise InvalidRequest("field 'jwk' holds private key material; send the public key only")
    if set(jwk) - _JWK_MEMBERS:
        raise InvalidRequest(
            "field 'jwk' has members other than kty, crv, x, kid, alg, use, key_ops"
        )
    if jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
        raise InvalidRequest("field 'jwk' must be an OKP Ed25519 key (RFC 8037)")
    if "kid" in jwk and jwk["kid"] != kid:
        raise InvalidRequest("the JWK's kid differs from field 'kid'")
    if jwk.get("alg", DEFAULT_JWK_ALG) not in JWK_ALGS or jwk.get("use", "sig") != "sig":
        raise InvalidRequest("field 'jwk' must be alg Ed25519 or EdDSA, use sig")
    x = jwk.get("x")
    if not isinstance(x, str) or not re.fullmatch(r"[A-Za-z0-9_-]{43}", x):
        raise InvalidRequest("field 'jwk' member x must be 32 bytes of unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(x + "=")
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("field 'jwk' member x is not base64url") from exc
    if b64url(raw) != x:
        raise InvalidRequest("field 'jwk' member x is not canonical base64url")
    reason = weakness(raw)
    if reason is not None:
        raise InvalidRequest(f"field 'jwk' member x is not an acceptable Ed25519 key: {reason}")
    return raw


def _seconds(value: object) -> int | None:
    """A stored time as integer Unix seconds (older files hold fractions); None if absent."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return None
    return int(value) if abs(value) < 1e15 else None


def pem_public(pem: bytes) -> bytes:
    """The raw key of a PEM SubjectPublicKeyInfo Ed25519 key; ValueError otherwise."""
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return check_public(
        key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )


@dataclass(frozen=True)
class PeerKey:
    tenant: str
    kid: str
    public: bytes  # raw 32 bytes
    state: str = "active"  # "active" or "retired"
    source: str = "api"  # "config" or "api"
    added_at: int = 0  # Unix seconds
    retired_at: int | None = None

    def verifier(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.public)

    def to_json(self, alg: str = DEFAULT_JWK_ALG) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "kid": self.kid,
            "state": self.state,
            "source": self.source,
            "added_at": self.added_at,
            "retired_at": self.retired_at,
            "jwk": to_jwk(self.kid, self.public, alg),
        }


def _record(key: PeerKey) -> dict[str, Any]:
    return {
        "tenant": key.tenant,
        "kid": key.kid,
        "x": b64url(key.public),
        "state": key.state,
        "added_at": key.added_at,
        "retired_at": key.retired_at,
    }


@dataclass(frozen=True)
class _View:
    """Every trusted key by (tenant, kid), and the tenants that trust each public key."""

    keys: Mapping[tuple[str, str], PeerKey]
    tenants: Mapping[bytes, frozenset[str]]
    shared: frozenset[bytes]  # public keys trusted for more than one tenant

    @classmethod
    def of(
        cls,
        configured: Mapping[tuple[str, str], PeerKey],
        stored: Mapping[tuple[str, str], PeerKey],
    ) -> _View:
        merged = dict(configured)
        for ident, key in stored.items():
            if ident in merged:  # a stored record of a configured key carries its retirement
                merged[ident] = replace(merged[ident], state=key.state, retired_at=key.retired_at)
            else:
                merged[ident] = key
        tenants: dict[bytes, set[str]] = {}
        for key in merged.values():
            tenants.setdefault(key.public, set()).add(key.tenant)
        return cls(
            merged,
            {public: frozenset(names) for public, names in tenants.items()},
            frozenset(public for public, names in tenants.items() if len(names) > 1),
        )

    def shared_keys(self) -> list[PeerKey]:
        return [k for k in self.keys.values() if k.public in self.shared]


class TrustedKeys:
    def __init__(
        self, state_dir: str, configured: Iterable[PeerKey] = (), *, allow_shared: bool = False
    ) -> None:
        self.path = os.path.join(state_dir, FILE_NAME)
        self.allow_shared = allow_shared
        self._configured = {(k.tenant, k.kid): k for k in configured}
        self._stored: dict[tuple[str, str], PeerKey] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._view: _View | None = None
        self._verifiers: dict[tuple[str, str, bytes], Ed25519PublicKey] = {}
        self._lock = threading.Lock()
        with contextlib.suppress(BackendUnavailable):  # logged; lookups answer 503 meanwhile
            self._reload()

    # --- reading ---------------------------------------------------------------

    def _reload(self) -> None:
        """Re-read the file when it changed (inode, size, mtime); 503 when it is unreadable."""
        try:
            self._read()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._stamp, self._view = None, None
            log.error("signerd.trusted_keys_unreadable error=%s", type(exc).__name__)
            raise BackendUnavailable("the trusted key store cannot be read") from exc

    def _read(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._stamp is not None or self._view is None:
                self._stored, self._stamp, self._view = {}, None, None
            return
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        with open(self.path, "rb") as fh:
            doc = json.loads(fh.read())
        stored: dict[tuple[str, str], PeerKey] = {}
        for rec in doc["keys"]:
            raw = check_public(base64.urlsafe_b64decode(str(rec["x"]) + "="))
            if rec["state"] not in ("active", "retired"):
                raise ValueError("not a trusted key record")
            key = PeerKey(
                tenant=str(rec["tenant"]),
                kid=str(rec["kid"]),
                public=raw,
                state=str(rec["state"]),
                source="api",
                added_at=_seconds(rec.get("added_at")) or 0,
                retired_at=_seconds(rec.get("retired_at")),
            )
            stored[(key.tenant, key.kid)] = key
        self._stored, self._stamp, self._view = stored, stamp, None

    def _current(self) -> _View:
        """The configured and stored keys as one view (rebuilt when the file changed)."""
        self._reload()
        if self._view is None:
            self._view = _View.of(self._configured, self._stored)
            if self._view.shared and not self.allow_shared:
                log.error(
                    "signerd.trusted_key_shared entries=%s verifying=none",
                    ",".join(sorted(f"{k.tenant}/{k.kid}" for k in self._view.shared_keys())),
                )
        return self._view

    def lookup(self, tenant: str, kid: str) -> tuple[PeerKey, Ed25519PublicKey]:
        """The active peer key ``kid`` of ``tenant`` and its verifier.

        Raises UnknownKid (no tenant trusts this kid), TenantMismatch (another
        tenant does), RetiredKid, or SharedPeerKey (its public key is trusted
        for another tenant too, and sharing is not allowed).
        """
        with self._lock:
            view = self._current()
        key = view.keys.get((tenant, kid))
        if key is None:
            if any(k == kid for _, k in view.keys):
                raise TenantMismatch()
            raise UnknownKid()
        if key.state != "active":
            raise RetiredKid()
        if key.public in view.shared and not self.allow_shared:
            raise SharedPeerKey(
                "this kid's public key is trusted for several tenants; it verifies for none"
            )
        ident = (key.tenant, key.kid, key.public)
        verifier = self._verifiers.get(ident)
        if verifier is None:
            verifier = self._verifiers[ident] = key.verifier()
        return key, verifier

    def reconfigure(self, configured: Iterable[PeerKey], *, allow_shared: bool) -> None:
        """Take the configuration's keys and sharing rule anew (a reload)."""
        with self._lock:
            self._configured = {(k.tenant, k.kid): k for k in configured}
            self.allow_shared, self._view = allow_shared, None

    def list(self, tenant: str | None) -> list[PeerKey]:
        with self._lock:
            view = self._current()
        return sorted(
            (k for k in view.keys.values() if tenant is None or k.tenant == tenant),
            key=lambda k: (k.tenant, k.kid),
        )

    def tenants_of(self, public: bytes) -> frozenset[str]:
        """The tenants that trust ``public`` (under any kid, active or retired)."""
        with self._lock:
            return self._current().tenants.get(public, frozenset())

    # --- changing (blocking: run in a thread) -------------------------------------

    def add(self, tenant: str, kid: str, public: bytes) -> PeerKey:
        with self._locked():
            view = self._current()
            if (tenant, kid) in view.keys:
                raise KeyExists("this tenant already trusts a key with this kid")
            if not self.allow_shared and view.tenants.get(public, frozenset()) - {tenant}:
                raise SharedPeerKey()
            key = PeerKey(tenant, kid, public, added_at=int(time.time()))
            self._write({**self._stored, (tenant, kid): key})
            return key

    def retire(self, tenant: str, kid: str) -> PeerKey:
        with self._locked():
            key = self._current().keys.get((tenant, kid))
            if key is None:
                raise UnknownKey("this tenant trusts no key with this kid")
            if key.state == "retired":
                raise InvalidState("the trusted key is already retired")
            retired = replace(key, state="retired", retired_at=int(time.time()))
            self._write({**self._stored, (tenant, kid): replace(retired, source="api")})
            return retired

    @contextlib.contextmanager
    def _locked(self) -> Any:
        os.makedirs(os.path.dirname(self.path), mode=0o750, exist_ok=True)
        with self._lock, open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._reload()
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _write(self, stored: dict[tuple[str, str], PeerKey]) -> None:
        doc = {"v": 1, "keys": [_record(k) for _, k in sorted(stored.items())]}
        data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._stamp = None
        self._reload()
