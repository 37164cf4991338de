"""Logging in to Vault / OpenBao and keeping signerd's token fresh.

``Auth`` logs in (token file or AppRole), renews the token once two thirds of
its TTL have passed, logs in again when a renewal comes back capped by the max
TTL, and logs in once more when the transport reports a 403. A token or
credentials Vault refuses are ``CredentialsRefused``. The token is never
logged.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import hvac.exceptions

from ...errors import BackendUnavailable, SignerdError
from .. import CredentialsRefused
from ._http import ClientFactory, describe_cause, translate

log = logging.getLogger("signerd.vault")

#: retry a failed login or renewal this soon (seconds), while the token lasts
_RETRY_DELAY = 1.0


@dataclass(frozen=True)
class Lease:
    token: str
    ttl: float  # seconds; 0 = never expires
    renewable: bool


class TokenSource(Protocol):
    @property
    def kind(self) -> str: ...

    def login(self, client: Any) -> Lease:
        """Obtain a token; raise hvac/requests exceptions or SignerdError."""
        ...


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        log.error("signerd.vault.secret_unreadable key=%s cause=%s", what, exc.strerror)
        if isinstance(exc, FileNotFoundError | PermissionError):
            raise CredentialsRefused(
                f"cannot read the Vault {what}", reason=type(exc).__name__
            ) from exc
        raise BackendUnavailable(f"cannot read the Vault {what}") from exc
    if not text:
        raise BackendUnavailable(f"the Vault {what} is empty")
    return text


@dataclass(frozen=True)
class TokenFile:
    """A token written by an operator or Vault Agent; "logging in" re-reads the file."""

    path: Path
    kind: str = "token_file"

    def login(self, client: Any) -> Lease:
        token = _read_secret(self.path, "token_file")
        client.adapter.token = token
        data = client.adapter.request("GET", "v1/auth/token/lookup-self")["data"]
        ttl = float(data.get("ttl") or 0)
        if ttl == 0 and data.get("expire_time"):
            ttl = 1.0  # expiring within the second (a TTL of 0 means "never")
        return Lease(token, ttl, bool(data.get("renewable")))


@dataclass(frozen=True)
class AppRole:
    """AppRole login; both ids are re-read at each login, so they can be rotated."""

    role_id_file: Path
    secret_id_file: Path
    mount: str = "approle"
    kind: str = "approle"

    def login(self, client: Any) -> Lease:
        body = {
            "role_id": _read_secret(self.role_id_file, "approle_role_id_file"),
            "secret_id": _read_secret(self.secret_id_file, "approle_secret_id_file"),
        }
        client.adapter.token = None
        auth = client.adapter.request("POST", f"v1/auth/{self.mount}/login", json=body)["auth"]
        return Lease(
            str(auth["client_token"]),
            float(auth.get("lease_duration") or 0),
            bool(auth["renewable"]),
        )


class Auth:
    """The shared token: login, renewal at 2/3 of the TTL, re-login near the max TTL."""

    def __init__(self, source: TokenSource, make_client: ClientFactory) -> None:
        self._source = source
        self._client = make_client()  # used only under self._lock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._generation = 0
        self._full_ttl = 0.0  # TTL of a fresh token; a smaller renewal means "capped"
        self._renewable = False
        self._refresh_at = math.inf
        self._expires_at = math.inf
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.login_attempts = 0  # observable: how many times signerd logged in
        self.renewals = 0

    def token(self) -> tuple[str, int]:
        """The current token and its generation, logging in or renewing when due."""
        found = self.cached()
        if found is not None:
            return found  # renewal is the background thread's job
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._login_locked(raising=True)
            assert self._token is not None
            return self._token, self._generation

    def cached(self) -> tuple[str, int] | None:
        """The current token and its generation, when no login is due (never blocks)."""
        token = self._token
        if token is not None and time.monotonic() < self._expires_at:
            return token, self._generation
        return None

    def relogin(self, generation: int) -> None:
        """Log in again after a 403, unless another thread already did."""
        with self._lock:
            if generation == self._generation:
                log.warning("signerd.vault.relogin reason=forbidden source=%s", self._source.kind)
                self._login_locked(raising=True)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._client.adapter.close()

    # --- internals (hold self._lock) ---

    def _login_locked(self, *, raising: bool) -> None:
        self.login_attempts += 1
        try:
            lease = self._source.login(self._client)
        except SignerdError:
            if raising:
                raise
            self._refresh_at = time.monotonic() + _RETRY_DELAY
            return
        except Exception as exc:
            err = _login_error(exc)
            if raising:
                raise err from exc
            self._refresh_at = time.monotonic() + _RETRY_DELAY
            return
        if lease.token != self._token:
            self._generation += 1
        self._token = lease.token
        self._renewable = lease.renewable
        self._full_ttl = lease.ttl
        self._schedule(lease.ttl)
        log.info(
            "signerd.vault.login source=%s ttl=%s renewable=%s",
            self._source.kind,
            int(lease.ttl),
            lease.renewable,
        )

    def _refresh_locked(self) -> None:
        """Renew the token, or log in again when it cannot be renewed any more."""
        if not self._renewable:
            self._login_locked(raising=False)
            return
        self.renewals += 1
        try:
            self._client.adapter.token = self._token
            auth = self._client.adapter.request("POST", "v1/auth/token/renew-self", json={})["auth"]
            ttl = float(auth.get("lease_duration") or 0)
        except hvac.exceptions.Forbidden:
            log.warning("signerd.vault.renew_refused source=%s", self._source.kind)
            self._login_locked(raising=False)
            return
        except Exception as exc:
            log.warning("signerd.vault.renew_failed cause=%s", describe_cause(exc))
            self._refresh_at = time.monotonic() + _RETRY_DELAY
            return
        self._schedule(ttl)
        if ttl + 1 < self._full_ttl:
            # the renewal was capped by the max TTL: get a fresh token now
            log.info("signerd.vault.renew_capped ttl=%s", int(ttl))
            self._login_locked(raising=False)

    def _schedule(self, ttl: float) -> None:
        now = time.monotonic()
        if ttl <= 0:
            self._refresh_at = self._expires_at = math.inf
            return
        self._expires_at = now + ttl
        self._refresh_at = now + max(ttl * 2 / 3, min(_RETRY_DELAY, ttl))
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="signerd-vault-auth", daemon=True
            )
            self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        """Keep the token fresh while no request comes to do it."""
        while not self._stop.is_set():
            delay = self._refresh_at - time.monotonic()
            if delay > 0:
                self._wake.clear()
                self._wake.wait(timeout=min(delay, 3600.0))
                continue
            with self._lock:
                if not self._stop.is_set() and time.monotonic() >= self._refresh_at:
                    self._refresh_locked()


def _login_error(exc: BaseException) -> SignerdError:
    err = translate(exc, "login")
    return err if isinstance(err, BackendUnavailable) else BackendUnavailable("Vault login failed")
