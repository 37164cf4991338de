"""The transit sign path: kept-alive ``http.client`` connections, one per thread.

hvac (and under it requests and urllib3) costs several hundred microseconds of
Python per request, most of a sign through signerd; the sign path is one POST
with a small JSON body, so it is sent here over a plain ``http.client``
connection kept alive per executor thread. hvac stays for logging in, renewing
and every administrative call (``Transport``); the token comes from the same
``Auth``, so a re-login on either path serves both.

Behaviour matches ``Transport.request``: the namespace header, the CA bundle
(``ca_file``, else the bundle requests would use), the timeout per socket
operation, one more try after a refused or dropped connection (signing is safe
to repeat), one re-login on 401/403, and Vault's error answers translated
through the same hvac exception classes, so that a sealed Vault is
``BackendSealed``, a refusal keeps its ``errors`` for classification, and a 404
is ``NotFoundInVault``. The token is never logged.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import hvac.exceptions
import hvac.utils

from ._vault_auth import Auth, Json, NotFoundInVault, VaultSettings, translate
from .errors import BackendError, BackendUnavailable

log = logging.getLogger("signerd.vault")

#: the same POST through hvac, for answers only hvac handles (redirects)
Fallback = Callable[[str, Json], Json]

#: an answer larger than this is not a sign answer (a batch of 1,000 is ~120 kB)
_MAX_ANSWER = 16 * 1024 * 1024


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The CA bundle hvac/requests would use: ``ca_file``, else certifi's."""
    if ca_file is None:
        try:
            import certifi  # requests' own bundle; installed with it

            ca_file = certifi.where()
        except ImportError:  # pragma: no cover - requests depends on certifi
            pass
    return ssl.create_default_context(cafile=ca_file)


class SignClient:
    """POSTs to Vault over one kept-alive connection per calling thread."""

    def __init__(self, settings: VaultSettings, auth: Auth, fallback: Fallback) -> None:
        url = urlsplit(settings.addr)
        assert url.hostname is not None  # parse_settings checked the address
        self._host = url.hostname
        self._port = url.port
        self._timeout = settings.timeout
        self._context = _tls_context(settings.ca_file) if url.scheme == "https" else None
        self._headers = {
            "Content-Type": "application/json",
            "X-Vault-Request": "true",
        }
        if settings.namespace:
            self._headers["X-Vault-Namespace"] = settings.namespace
        self.auth = auth
        self._fallback = fallback
        self._local = threading.local()
        self._connections: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self._context is not None:
                conn = http.client.HTTPSConnection(
                    self._host, self._port, timeout=self._timeout, context=self._context
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _drop(self) -> None:
        """Close this thread's connection (after an error it may be mid-answer)."""
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    def _exchange(self, path: str, payload: bytes, token: str) -> tuple[int, bytes]:
        conn = self._connection()
        headers = dict(self._headers)
        headers["X-Vault-Token"] = token
        conn.request("POST", "/v1/" + path, payload, headers)
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > _MAX_ANSWER:
            raise http.client.HTTPException("answer too large")
        return response.status, response.read(_MAX_ANSWER + 1)

    def post(self, path: str, body: Json) -> Json:
        """POST ``body`` to ``v1/<path>``; the JSON answer.

        Raises NotFoundInVault on 404 and a SignerdError for anything else
        that goes wrong, as ``Transport.request`` does.
        """
        payload = json.dumps(body, separators=(",", ":")).encode()
        relogged = retried = False
        while True:
            token, generation = self.auth.token()
            try:
                status, answer = self._exchange(path, payload, token)
            except TimeoutError as exc:
                self._drop()
                _log_cause(exc)
                raise BackendUnavailable("Vault did not answer in time") from exc
            except ssl.SSLError as exc:  # certificate refused, handshake failed
                self._drop()
                _log_cause(exc)
                raise BackendUnavailable("TLS connection to Vault failed") from exc
            except (OSError, http.client.HTTPException) as exc:
                # refused, reset, or a kept-alive connection Vault closed
                self._drop()
                if not retried:
                    log.info("signerd.vault.retry path=%s cause=%s", path, type(exc).__name__)
                    retried = True
                    continue
                _log_cause(exc)
                raise BackendUnavailable("cannot reach Vault") from exc
            if len(answer) > _MAX_ANSWER:
                self._drop()
                raise BackendError("Vault answered something signerd does not understand")
            if status == 200:
                return _json_object(answer, path, status)
            if status == 204:
                return {}
            if 300 <= status < 400:
                # a standby node's redirect: hvac (requests) follows those
                return self._fallback(path, body)
            error = _vault_error(status, answer, path)
            if isinstance(error, hvac.exceptions.Forbidden | hvac.exceptions.Unauthorized):
                if relogged:
                    raise translate(error, "request") from error
                log.warning("signerd.vault.forbidden path=%s", path)
                self.auth.relogin(generation)
                relogged = True
                continue
            if isinstance(error, hvac.exceptions.InvalidPath):
                if error.errors and any("no handler for route" in e for e in error.errors):
                    raise translate(error, "request") from error
                raise NotFoundInVault(path) from error
            raise translate(error, "request") from error

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()


def _json_object(answer: bytes, path: str, status: int) -> Json:
    try:
        parsed = json.loads(answer)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        log.warning("signerd.vault.not_json path=%s status=%s", path, status)
        raise BackendError("Vault answered an unexpected error")
    return parsed


def _vault_error(status: int, answer: bytes, path: str) -> hvac.exceptions.VaultError:
    """The hvac exception hvac itself raises for this error answer."""
    text = answer.decode("utf-8", "replace")
    parsed: Any = None
    errors: Any = None
    with contextlib.suppress(ValueError):
        parsed = json.loads(answer)
    if isinstance(parsed, dict):
        errors = parsed.get("errors")
    else:
        parsed = None
    try:
        hvac.utils.raise_for_error(
            "POST",
            "/v1/" + path,
            status,
            text if errors is None else None,
            errors=errors,
            text=text,
            json=parsed,
        )
    except hvac.exceptions.VaultError as exc:
        return exc
    raise AssertionError("raise_for_error returned")  # pragma: no cover


def _log_cause(exc: BaseException) -> None:
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    log.warning("signerd.vault.request_failed code=%s cause=%s", BackendUnavailable.code, cause)
