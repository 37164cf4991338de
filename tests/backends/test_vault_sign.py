"""The transit sign path's own client (kept-alive http.client) against a real ``bao server -dev``."""

from __future__ import annotations

import http.server
import socket
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.backends.vault import SignClient, VaultBackend, from_config
from signerd.errors import BackendError, BackendUnavailable, UnknownKey, UnknownVersion
from signerd.wire import KeyName

from ..conftest import unique
from ..support.openbao import BaoServer, FaultProxy, dev_server, vault_backend_config


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("vs"), "fast")


def verifies(public_key: bytes, signature: bytes | Exception, data: bytes) -> bool:
    if not isinstance(signature, bytes):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except Exception:
        return False
    return True


def connections(proxy: FaultProxy) -> int:
    """TCP connections the proxy has accepted so far."""
    return len(proxy._sockets) // 2


def test_signs_keep_one_connection_per_thread(bao: BaoServer, make: Any, key: KeyName) -> None:
    """Signs from 3 threads open 3 connections in all, kept alive across 20 signs each."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        backend.describe(key)  # login and the hvac connection
        before = connections(proxy)
        errors: list[object] = []

        def signer() -> None:
            for i in range(20):
                (sig,) = backend.sign(key, 1, [b"%d" % i])
                if not isinstance(sig, bytes):
                    errors.append(sig)

        threads = [threading.Thread(target=signer) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        signs = [line for line in proxy.forwarded if b"/sign/" in line]
        assert errors == [] and len(signs) == 60
        assert connections(proxy) - before == 3


def test_lost_sign_answer_is_sent_again_once(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A sign whose answer is lost (connection dropped) is sent once more and succeeds."""
    info = make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        backend.sign(key, 1, [b"warm"])  # a kept-alive connection, as in a running daemon
        proxy.drop_answer(b"/sign/")
        (sig,) = backend.sign(key, 1, [b"again"])
        signs = [line for line in proxy.forwarded if b"/sign/" in line]
    assert proxy.dropped and len(signs) == 3
    assert verifies(info.versions[0].public_key, sig, b"again")


def test_server_that_drops_every_connection(make: Any) -> None:
    """Connections closed unanswered: one more try, then BackendUnavailable (never a hang)."""
    backend = make()
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[int] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.recv(65536)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    addr = f"http://127.0.0.1:{listener.getsockname()[1]}"
    client = SignClient(replace(backend.settings, addr=addr), backend.transport.auth, _no_fallback)
    try:
        with pytest.raises(BackendUnavailable) as caught:
            client.post("transit/sign/any", {"input": "eA=="})
        assert "cannot reach" in str(caught.value) and len(accepted) == 2
    finally:
        client.close()
        listener.close()
        thread.join(timeout=5)


def _no_fallback(path: str, body: Any) -> Any:
    raise AssertionError("the hvac path was not expected here")


def test_errors_are_those_of_the_hvac_path(make: Any, key: KeyName) -> None:
    """Unknown key, version above the latest: the same typed errors as through hvac."""
    backend = make()
    with pytest.raises(UnknownKey):
        backend.sign(key, 1, [b"x"])
    backend.create(key)
    with pytest.raises(UnknownVersion):
        backend.sign(key, 7, [b"x"])


def test_sign_in_a_namespace(bao: BaoServer, make: Any, key: KeyName) -> None:
    """With namespace set, the sign goes to the key in that namespace and verifies."""
    ns = unique("ns")
    bao.api("POST", f"sys/namespaces/{ns}", {})
    bao.enable_transit("transit", namespace=ns)
    bao.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}}, namespace=ns)
    backend = make(namespace=ns)
    info = backend.create(key)
    assert verifies(info.versions[0].public_key, backend.sign(key, 1, [b"ns"])[0], b"ns")
    with pytest.raises(UnknownKey):
        make().sign(key, 1, [b"ns"])  # not in the root namespace


def test_tls_needs_the_configured_ca(tmp_path: Path, key: KeyName) -> None:
    """Over HTTPS the sign client trusts ca_file; without it the sign is BackendUnavailable."""
    with dev_server(tmp_path / "tls", tls=True) as server:
        backend = from_config(vault_backend_config(server))
        untrusting = SignClient(
            replace(backend.settings, ca_file=None),
            backend.transport.auth,
            _no_fallback,
        )
        try:
            info = backend.create(key)
            assert verifies(info.versions[0].public_key, backend.sign(key, 1, [b"t"])[0], b"t")
            path = f"transit/sign/{backend.settings.key_prefix}{key.tenant}.{key.name}"
            with pytest.raises(BackendUnavailable) as caught:
                untrusting.post(path, {"key_version": 1, "input": "dA=="})
            assert "TLS" in str(caught.value)
        finally:
            untrusting.close()
            backend.close()


class _Redirector(http.server.BaseHTTPRequestHandler):
    """Answers every request with 307 to the same path on ``target`` (a standby node)."""

    target = ""

    def _redirect(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(307)
        self.send_header("Location", self.target + self.path)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = do_LIST = _redirect

    def log_message(self, *args: Any) -> None:
        pass


def test_redirect_is_followed_through_hvac(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A 307 from a standby node: the sign goes through hvac, which follows it, and verifies."""
    info = make().create(key)
    handler = type("Handler", (_Redirector,), {"target": bao.addr})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = make(addr=f"http://127.0.0.1:{server.server_address[1]}")
        (sig,) = backend.sign(key, 1, [b"standby"])
        assert verifies(info.versions[0].public_key, sig, b"standby")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_malformed_answer_is_backend_error(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A 200 answer that is not a JSON object is BackendError, never a crash."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        backend.sign(key, 1, [b"warm"])
        proxy.rewrite(b'{"request_id"', b'["request_id"')
        with pytest.raises(BackendError):
            backend.sign(key, 1, [b"x"])


def test_concurrent_rotates_through_two_backends_each_name_their_own_version(
    make: Any, key: KeyName
) -> None:
    """Two processes rotating one transit key at once: each rotate names the version it made."""
    first, second = make(), make()
    first.create(key)
    barrier = threading.Barrier(2)
    made: list[int | None] = []

    def rotate(backend: VaultBackend) -> None:
        barrier.wait(10)
        made.append(backend.rotate(key, pending=False).made)

    threads = [threading.Thread(target=rotate, args=(b,)) for b in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(v for v in made if v is not None) == [2, 3], made
