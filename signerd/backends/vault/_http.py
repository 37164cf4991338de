"""Requests to Vault / OpenBao through hvac, and the translation of their errors.

The transport gives each thread its own hvac client (and so its own requests
session), all sharing one token kept by ``Auth`` (see ``_auth``); a 403 makes
it log in once more, and a second 403 is ``BackendUnavailable``.

Every hvac and requests exception is translated here into a ``signerd.errors``
class, with the cause logged on ``signerd.vault``; a token Vault refuses is
``CredentialsRefused``. The token is never logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import hvac.exceptions
import requests

from ...errors import BackendError, BackendSealed, BackendUnavailable, SignerdError
from .. import CredentialsRefused
from ._nodes import Nodes

log = logging.getLogger("signerd.vault")

Json = dict[str, Any]
ClientFactory = Callable[[], Any]  # -> hvac.Client

_KV_UPGRADING = "Upgrading from non-versioned to versioned data"


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
    elif isinstance(exc, hvac.exceptions.InvalidRequest) and any(
        _KV_UPGRADING in str(e) for e in exc.errors or ()
    ):
        err = BackendUnavailable("Vault is not ready")  # a new KV v2 mount, for a moment
    elif isinstance(exc, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
        err = CredentialsRefused("Vault refused signerd's token", reason=type(exc).__name__)
    else:
        err = BackendError("Vault answered an unexpected error")
    log.warning("signerd.vault.%s_failed code=%s cause=%s", what, err.code, describe_cause(exc))
    return err


def describe_cause(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def connection_failed(exc: BaseException | None) -> bool:
    """A refused or dropped connection: worth one more try when that is safe.

    Timeouts are not (the deadline is spent), nor are TLS failures; a
    kept-alive connection can die with a Vault restart.
    """
    return isinstance(exc, requests.exceptions.ConnectionError) and not isinstance(
        exc, requests.exceptions.Timeout | requests.exceptions.SSLError
    )


def node_unusable(exc: BaseException) -> bool:
    """Vault's answer says this node cannot serve now (sealed, standby, not ready)."""
    return isinstance(
        exc,
        hvac.exceptions.VaultDown
        | hvac.exceptions.VaultNotInitialized
        | hvac.exceptions.BadGateway,
    )


class TokenHolder(Protocol):
    """Where the transport gets its token (``Auth``)."""

    def token(self) -> tuple[str, int]:
        """The current token and its generation."""
        ...

    def relogin(self, generation: int) -> None:
        """Log in again after a 403, unless another thread already did."""
        ...

    def close(self) -> None: ...


_A = TypeVar("_A", bound=TokenHolder)


class Transport(Generic[_A]):
    """One hvac client per thread; every request goes through ``request``."""

    def __init__(self, make_client: ClientFactory, auth: _A, nodes: Nodes | None = None) -> None:
        self._make_client = make_client
        self.auth = auth
        #: the cluster's nodes; the clients' adapters send to ``nodes.current``
        self.nodes = nodes
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
        nodes = self.nodes
        if nodes is not None:
            nodes.check_due()
        relogged = retried = False
        while True:
            token, generation = self.auth.token()
            client.adapter.token = token
            seen = nodes.generation if nodes is not None else 0
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
                if (
                    nodes is not None
                    and nodes.clustered
                    and not isinstance(exc, requests.exceptions.SSLError)
                ):
                    nodes.failover(seen)  # raises while no node is active
                if retry and not retried and connection_failed(exc):
                    log.info("signerd.vault.retry path=%s cause=%s", path, type(exc).__name__)
                    retried = True
                    continue
                raise translate(exc, "request") from exc
            except hvac.exceptions.VaultError as exc:
                if nodes is not None and nodes.clustered and node_unusable(exc):
                    nodes.failover(seen)
                    if retry and not retried:
                        retried = True
                        continue
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
