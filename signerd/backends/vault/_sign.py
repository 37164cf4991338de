"""The transit sign path: kept-alive connections, one per thread, parsed by httptools.

hvac (and under it requests and urllib3) costs ~750 µs of Python per request on
a small machine, more than transit takes to sign; ``http.client`` still costs
~180 µs (its header parsing goes through the email package). The sign path is
one POST with a small JSON body, so it is written here to a socket kept alive
per executor thread, and the answer is parsed by httptools (llhttp): ~55 µs.
hvac stays for logging in, renewing and every administrative call
(``Transport``); the token comes from the same ``Auth``, so a re-login on
either path serves both. A path that would need quoting, and a redirect (a
standby node), go through hvac.

Behaviour matches ``Transport.request``: the namespace header, the CA bundle
(``ca_file``, else the bundle requests would use), the timeout per socket
operation, one more try after a refused or dropped connection (signing is safe
to repeat), one re-login on 401/403, and Vault's error answers translated
through the same hvac exception classes, so that a sealed Vault is
``BackendSealed``, a refusal keeps its ``errors`` for classification, and a 404
is ``NotFoundInVault``. The token is never logged.

A worker sends most signs from its event loop instead (``_loopsign``), over
connections of the loop's own; what that path does not take comes here.

The answers are read here too: each item's signature, or its error in place
(``parse_signature``), and a refused sign mapped to the precise error
(``sign_refusal``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httptools
import hvac.exceptions
import hvac.utils

from ...errors import (
    BackendError,
    BackendUnavailable,
    InvalidState,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ._auth import Auth
from ._http import Json, NotFoundInVault, node_unusable, translate
from ._nodes import Nodes
from ._settings import VaultSettings

log = logging.getLogger("signerd.vault")

#: the same POST through hvac, for answers only hvac handles (redirects)
Fallback = Callable[[str, Json], Json]

#: paths sent as they are (signerd's names and mounts never need quoting)
PATH_RE = re.compile(r"[A-Za-z0-9_./-]+")
TOKEN_RE = re.compile(r"[\x21-\x7e]+")

#: an answer larger than this is not a sign answer (a batch of 1,000 is ~120 kB)
MAX_ANSWER = 16 * 1024 * 1024


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """The CA bundle hvac/requests would use: ``ca_file``, else certifi's."""
    if ca_file is None:
        try:
            import certifi  # requests' own bundle; installed with it

            ca_file = certifi.where()
        except ImportError:  # pragma: no cover - requests depends on certifi
            pass
    return ssl.create_default_context(cafile=ca_file)


class Answer:
    """httptools callbacks for one answer: its body, and whether it is complete."""

    __slots__ = ("body", "complete", "keep_alive", "parser", "size")

    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.size = 0
        self.complete = False
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        # read here: llhttp resets its flags once the message is complete
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= MAX_ANSWER:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    """One kept-alive HTTP/1.1 connection; answers parsed by httptools (llhttp)."""

    def __init__(
        self, addr: str, host: str, port: int, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        self.addr = addr
        self._host, self._port, self.timeout, self.tls_context = host, port, timeout, context
        self._sock: socket.socket | None = None

    def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Send one request, read its answer: (status, body)."""
        sock = self._sock
        if sock is None:
            sock = socket.create_connection((self._host, self._port), timeout=self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self._host)
            self._sock = sock
        sock.sendall(request)
        answer = Answer()
        parser = answer.parser
        while not answer.complete:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("Vault closed the connection")
            parser.feed_data(chunk)
            if answer.size > MAX_ANSWER:
                raise _TooLarge("answer too large")
        if not answer.keep_alive:
            self.close()
        return parser.get_status_code(), b"".join(answer.body)

    @property
    def is_open(self) -> bool:
        return self._sock is not None

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


class _TooLarge(Exception):
    """An answer larger than any sign answer."""


class SignClient:
    """POSTs to Vault over one kept-alive connection per calling thread."""

    def __init__(
        self,
        settings: VaultSettings,
        auth: Auth,
        fallback: Fallback,
        nodes: Nodes | None = None,
    ) -> None:
        self.timeout = settings.timeout
        self._namespace = settings.namespace
        tls = urlsplit(settings.addr).scheme == "https"
        self.tls_context = _tls_context(settings.ca_file) if tls else None
        #: where to send: the cluster's node in use (``settings.addr`` alone by default)
        self.nodes = nodes if nodes is not None else Nodes((settings.addr,))
        self._endpoints: dict[str, tuple[str, int, str]] = {}
        self.auth = auth
        self._fallback = fallback
        self._local = threading.local()
        self._connections: list[_Connection] = []
        self._lock = threading.Lock()

    def endpoint(self, addr: str) -> tuple[str, int, str]:
        """(host, port, header lines) for one node's address."""
        found = self._endpoints.get(addr)
        if found is None:
            url = urlsplit(addr)
            assert url.hostname is not None  # parse_settings checked the address
            port = url.port or (443 if url.scheme == "https" else 80)
            host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
            head = f"Host: {host}:{port}\r\nContent-Type: application/json\r\n"
            head += "X-Vault-Request: true\r\n"
            if self._namespace:
                head += f"X-Vault-Namespace: {self._namespace}\r\n"
            found = self._endpoints[addr] = (url.hostname, port, head)
        return found

    def _connection(self, addr: str) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None and conn.addr != addr:
            conn.close()  # the cluster failed over: this thread's next request goes there
            conn = None
        if conn is None:
            host, port, _ = self.endpoint(addr)
            conn = _Connection(addr, host, port, self.timeout, self.tls_context)
            self._local.conn = conn
            with self._lock:
                self._connections = [c for c in self._connections if c.addr == addr or c.is_open]
                self._connections.append(conn)
        return conn

    def _drop(self) -> None:
        """Close this thread's connection (after an error it may be mid-answer)."""
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    def request(self, addr: str, path: str, payload: bytes, token: str) -> bytes:
        """The whole POST of ``payload`` to ``v1/<path>`` on node ``addr``."""
        head = (
            f"POST /v1/{path} HTTP/1.1\r\n{self.endpoint(addr)[2]}X-Vault-Token: {token}\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode("ascii") + payload

    def _exchange(self, path: str, payload: bytes, token: str) -> tuple[int, bytes]:
        addr = self.nodes.current
        return self._connection(addr).exchange(self.request(addr, path, payload, token))

    def post(self, path: str, body: Json) -> Json:
        """POST ``body`` to ``v1/<path>``; the JSON answer.

        Raises NotFoundInVault on 404 and a SignerdError for anything else
        that goes wrong, as ``Transport.request`` does.
        """
        if not PATH_RE.fullmatch(path):
            return self._fallback(path, body)  # needs quoting: leave it to requests
        payload = json.dumps(body, separators=(",", ":")).encode()
        nodes = self.nodes
        nodes.check_due()
        relogged = retried = False
        while True:
            token, generation = self.auth.token()
            if not TOKEN_RE.fullmatch(token):
                raise BackendUnavailable("the Vault token cannot be sent in a header")
            seen = nodes.generation
            try:
                status, answer = self._exchange(path, payload, token)
            except TimeoutError as exc:
                self._drop()
                log_cause(exc, BackendUnavailable.code)
                nodes.failover(seen)  # the next request goes to an active node
                raise BackendUnavailable("Vault did not answer in time") from exc
            except ssl.SSLError as exc:
                self._drop()
                if not retried and not isinstance(exc, ssl.SSLCertVerificationError):
                    retried = True  # a kept-alive TLS connection Vault closed
                    continue
                log_cause(exc, BackendUnavailable.code)
                raise BackendUnavailable("TLS connection to Vault failed") from exc
            except _TooLarge as exc:
                self._drop()
                log_cause(exc, BackendError.code)
                raise BackendError("Vault answered something signerd does not understand") from exc
            except (OSError, httptools.HttpParserError) as exc:
                # refused, reset, or a kept-alive connection Vault closed
                self._drop()
                nodes.failover(seen)  # a cluster: the first active node (or 503 while none)
                if not retried:
                    log.info("signerd.vault.retry path=%s cause=%s", path, type(exc).__name__)
                    retried = True
                    continue
                log_cause(exc, BackendUnavailable.code)
                raise BackendUnavailable("cannot reach Vault") from exc
            if status == 200:
                return json_object(answer, path, status)
            if status == 204:
                return {}
            if 300 <= status < 400:
                # a standby node's redirect: hvac (requests) follows those
                return self._fallback(path, body)
            error = _vault_error(status, answer, path)
            if nodes.clustered and node_unusable(error):
                self._drop()
                nodes.failover(seen)
                if not retried:
                    retried = True
                    continue
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


def json_object(answer: bytes, path: str, status: int) -> Json:
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


def log_cause(exc: BaseException, code: str) -> None:
    cause = " ".join(f"{type(exc).__name__}: {exc}".split())[:500]
    log.warning("signerd.vault.request_failed code=%s cause=%s", code, cause)


# --- answers ---

_SIGN_REFUSALS: tuple[tuple[str, type[SignerdError], str], ...] = (
    ("less than the minimum encryption", InvalidState, "version no longer signs"),
    ("higher than the latest", UnknownVersion, ""),
    ("no such key version", UnknownVersion, ""),  # trimmed (destroyed) through another host
    ("signing key not found", UnknownKey, ""),
)


def _classify(text: str) -> SignerdError | None:
    """The precise error for Vault's refusal of a sign, when it has one."""
    for needle, cls, message in _SIGN_REFUSALS:
        if needle in text:
            return cls(message or None)
    return None


def sign_refusal(exc: BackendError) -> SignerdError:
    return _classify(" ".join(getattr(exc.__cause__, "errors", None) or ())) or exc


def parse_signature(result: Any, version: int, causes: list[str]) -> bytes | SignerdError:
    """One signature from a sign answer, or the item's error in place (cause noted)."""
    try:
        if result.get("error"):
            causes.append(str(result["error"]))
            return _classify(str(result["error"])) or BackendError("Vault refused to sign")
        prefix, tag, encoded = str(result["signature"]).split(":")
        if prefix != "vault" or tag != f"v{version}":
            causes.append(f"asked for v{version}, Vault signed with {tag[:12]}")
            return BackendError("Vault signed with another key version")
        signature = base64.b64decode(encoded, validate=True)
        if len(signature) != 64:
            raise ValueError(f"signature of {len(signature)} bytes")
        return signature
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as exc:
        causes.append(f"malformed signature: {type(exc).__name__}")
        return BackendError("Vault answered a malformed signature")
