"""Talking to Vault / OpenBao: settings, HTTP transport, error translation, tokens.

The transport gives each thread its own hvac client (and so its own requests
session), all sharing one token kept by ``Auth``. ``Auth`` logs in (token file
or AppRole), renews the token once two thirds of its TTL have passed, logs in
again when a renewal comes back capped by the max TTL, and logs in once more
when Vault answers 403; a second 403 is ``BackendUnavailable``.

Every hvac and requests exception is translated here into a ``signerd.errors``
class, with the cause logged on ``signerd.vault``. The token is never logged.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import hvac
import hvac.exceptions
import requests

from ...errors import BackendError, BackendSealed, BackendUnavailable, SignerdError
from ...wire._names import valid_part

log = logging.getLogger("signerd.vault")

Json = dict[str, Any]
ClientFactory = Callable[[], Any]  # -> hvac.Client

#: retry a failed login or renewal this soon (seconds), while the token lasts
_RETRY_DELAY = 1.0


class NotFoundInVault(Exception):
    """Vault answered 404; callers turn it into UnknownKey or "nothing stored"."""


def translate(exc: BaseException, what: str) -> SignerdError:
    """The signerd error for an hvac/requests exception; logs the cause."""
    err: SignerdError
    if isinstance(exc, requests.exceptions.Timeout):
        err = BackendUnavailable("Vault did not answer in time")
    elif isinstance(exc, requests.exceptions.SSLError):
        err = BackendUnavailable("TLS connection to Vault failed")
    elif isinstance(exc, requests.exceptions.RequestException):
        err = BackendUnavailable("cannot reach Vault")
    elif isinstance(exc, hvac.exceptions.VaultDown):
        if any("sealed" in str(e).lower() for e in exc.errors or ()):
            err = BackendSealed("Vault is sealed")
        else:
            err = BackendUnavailable("Vault is not ready")
    elif isinstance(
        exc,
        hvac.exceptions.VaultNotInitialized
        | hvac.exceptions.RateLimitExceeded
        | hvac.exceptions.BadGateway,
    ):
        err = BackendUnavailable("Vault is not ready")
    elif isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
        err = BackendUnavailable("Vault refused signerd's token")
    else:
        err = BackendError("Vault answered an unexpected error")
    log.warning("signerd.vault.%s_failed code=%s cause=%s", what, err.code, _describe(exc))
    return err


def _describe(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def connection_failed(exc: BaseException | None) -> bool:
    """A refused or dropped connection: worth one more try when that is safe.

    Timeouts are not (the deadline is spent), nor are TLS failures; a
    kept-alive connection can die with a Vault restart.
    """
    return isinstance(exc, requests.exceptions.ConnectionError) and not isinstance(
        exc, requests.exceptions.Timeout | requests.exceptions.SSLError
    )


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
        token = self._token
        if token is not None and time.monotonic() < self._expires_at:
            return token, self._generation  # renewal is the background thread's job
        with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at:
                self._login_locked(raising=True)
            assert self._token is not None
            return self._token, self._generation

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
            log.warning("signerd.vault.renew_failed cause=%s", _describe(exc))
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


class Transport:
    """One hvac client per thread; every request goes through ``request``."""

    def __init__(self, make_client: ClientFactory, auth: Auth) -> None:
        self._make_client = make_client
        self.auth = auth
        self._local = threading.local()
        self._clients: list[Any] = []
        self._clients_lock = threading.Lock()

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._make_client()
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    def request(
        self, method: str, path: str, body: Json | None = None, *, retry: bool = True
    ) -> Json:
        """Send one request; the JSON answer ({} for 204).

        Raises NotFoundInVault on 404 and a SignerdError for anything else that
        goes wrong. ``retry`` allows one more try after a refused or dropped
        connection, for requests that are safe to repeat.
        """
        client = self._client()
        relogged = retried = False
        while True:
            token, generation = self.auth.token()
            client.adapter.token = token
            try:
                answer = client.adapter.request(method, "v1/" + path, json=body)
            except hvac.exceptions.InvalidPath as exc:
                if exc.errors and any("no handler for route" in e for e in exc.errors):
                    raise translate(exc, "request") from exc
                raise NotFoundInVault(path) from exc
            except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
                if relogged:
                    raise translate(exc, "request") from exc
                log.warning("signerd.vault.forbidden path=%s", path)
                self.auth.relogin(generation)
                relogged = True
                continue
            except requests.RequestException as exc:
                if retry and not retried and connection_failed(exc):
                    log.info("signerd.vault.retry path=%s cause=%s", path, type(exc).__name__)
                    retried = True
                    continue
                raise translate(exc, "request") from exc
            except hvac.exceptions.VaultError as exc:
                raise translate(exc, "request") from exc
            if isinstance(answer, dict):
                return answer
            if answer.status_code == 204:
                return {}
            log.warning("signerd.vault.not_json path=%s status=%s", path, answer.status_code)
            raise BackendError("Vault answered an unexpected error")

    def close(self) -> None:
        self.auth.close()
        with self._clients_lock:
            for client in self._clients:
                client.adapter.close()
            self._clients.clear()


# --- settings ---

_MOUNT_RE = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*")
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")
# fmt: off
_KNOWN = frozenset({
    "type", "addr", "namespace", "ca_file", "token_file", "approle_role_id_file",
    "approle_secret_id_file", "approle_mount", "mount", "tenant_mounts", "key_prefix",
    "metadata_mount", "timeout", "max_concurrency",
})
# fmt: on


@dataclass(frozen=True)
class VaultSettings:
    addr: str
    source: TokenFile | AppRole
    namespace: str | None = None
    ca_file: str | None = None
    mount: str = "transit"
    tenant_mounts: Mapping[str, str] = field(default_factory=dict)
    key_prefix: str = "signerd-"
    metadata_mount: str = "secret"
    timeout: float = 5.0
    max_concurrency: int = 8


def parse_settings(cfg: Mapping[str, Any]) -> VaultSettings:
    """Validate the backend's configuration table; ValueError names the bad key."""
    unknown = sorted(set(cfg) - _KNOWN)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_KNOWN))})")
    addr = _string(cfg, "addr", None)
    url = urlsplit(addr)
    try:
        port = url.port
    except ValueError:
        port = -1
    if (
        url.scheme not in ("http", "https")
        or not url.hostname
        or port == -1
        or url.path not in ("", "/")
        or url.query
    ):
        raise ValueError(f"addr: must be http(s)://host[:port], got {addr!r}")
    if url.scheme == "http" and url.hostname not in ("127.0.0.1", "::1", "localhost"):
        log.warning("signerd.vault.plain_http addr=%s (use https in production)", addr)
    ca_file = _optional_file(cfg, "ca_file")
    if ca_file and url.scheme != "https":
        raise ValueError("ca_file: only used with an https:// addr")
    namespace = _string(cfg, "namespace", "") or None
    if namespace is not None and not _MOUNT_RE.fullmatch(namespace.strip("/")):
        raise ValueError(f"namespace: not a Vault namespace path: {namespace!r}")
    token_file = _optional_file(cfg, "token_file")
    role_file = _optional_file(cfg, "approle_role_id_file")
    secret_file = _optional_file(cfg, "approle_secret_id_file")
    source: TokenFile | AppRole
    if token_file and (role_file or secret_file):
        raise ValueError("token_file: set either token_file or the approle_* files, not both")
    if token_file:
        if "approle_mount" in cfg:
            raise ValueError("approle_mount: only used with AppRole login")
        source = TokenFile(Path(token_file))
    elif role_file and secret_file:
        source = AppRole(
            Path(role_file), Path(secret_file), _mount(cfg, "approle_mount", "approle")
        )
    elif role_file or secret_file:
        missing = "approle_secret_id_file" if role_file else "approle_role_id_file"
        raise ValueError(
            f"{missing}: AppRole login needs both approle_role_id_file and approle_secret_id_file"
        )
    else:
        raise ValueError(
            "token_file: set token_file, or approle_role_id_file and approle_secret_id_file"
        )
    tenant_mounts = cfg.get("tenant_mounts", {})
    if not isinstance(tenant_mounts, Mapping):
        raise ValueError('tenant_mounts: must be a table of tenant = "mount"')
    for tenant, mount in tenant_mounts.items():
        if not isinstance(tenant, str) or not valid_part(tenant):
            raise ValueError(f"tenant_mounts: {tenant!r} is not a tenant name")
        if not isinstance(mount, str) or not _MOUNT_RE.fullmatch(mount):
            raise ValueError(f"tenant_mounts.{tenant}: not a mount path: {mount!r}")
    key_prefix = _string(cfg, "key_prefix", "signerd-")
    if not _PREFIX_RE.fullmatch(key_prefix):
        raise ValueError(f"key_prefix: must match [A-Za-z0-9_-]{{0,64}}, got {key_prefix!r}")
    timeout = cfg.get("timeout", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        raise ValueError(f"timeout: must be seconds in (0, 300], got {timeout!r}")
    concurrency = cfg.get("max_concurrency", 8)
    if (
        isinstance(concurrency, bool)
        or not isinstance(concurrency, int)
        or not 1 <= concurrency <= 64
    ):
        raise ValueError(f"max_concurrency: must be an integer from 1 to 64, got {concurrency!r}")
    return VaultSettings(
        addr=addr.rstrip("/"),
        source=source,
        namespace=namespace,
        ca_file=ca_file,
        mount=_mount(cfg, "mount", "transit"),
        tenant_mounts=dict(tenant_mounts),
        key_prefix=key_prefix,
        metadata_mount=_mount(cfg, "metadata_mount", "secret"),
        timeout=float(timeout),
        max_concurrency=concurrency,
    )


def _string(cfg: Mapping[str, Any], key: str, default: str | None) -> str:
    value = cfg.get(key, default)
    if value is None:
        raise ValueError(f"{key}: required")
    if not isinstance(value, str):
        raise ValueError(f"{key}: must be a string, got {value!r}")
    return value


def _mount(cfg: Mapping[str, Any], key: str, default: str) -> str:
    value = _string(cfg, key, default).strip("/")
    if not _MOUNT_RE.fullmatch(value):
        raise ValueError(f"{key}: not a mount path: {value!r}")
    return value


def _optional_file(cfg: Mapping[str, Any], key: str) -> str | None:
    value = _string(cfg, key, "")
    if not value:
        return None
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError(f"{key}: not a readable file: {value!r}")
    return value


def build_transport(settings: VaultSettings) -> Transport:
    def make() -> Any:
        client = hvac.Client(
            url=settings.addr,
            namespace=settings.namespace,
            verify=settings.ca_file or True,
            timeout=settings.timeout,
        )
        # Vault is reached directly: no proxy or CA bundle from the environment
        # (and no scan of os.environ on every request, a quarter of a sign's cost)
        client.adapter.session.trust_env = False
        return client

    return Transport(make, Auth(settings.source, make))
