"""Vault backend faults against a real on-disk OpenBao server: down, frozen, sealed, tokens."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.backends import CredentialsRefused
from signerd.backends.vault import VaultBackend, from_config
from signerd.errors import BackendSealed, BackendUnavailable, SignerdError
from signerd.wire import KeyName

from ..conftest import unique
from ..support.openbao import FileServer, file_server, vault_backend_config

TIMEOUT = 2.0  # the backend's per-call timeout in these tests

POLICY = """
path "transit/keys" { capabilities = ["list"] }
path "transit/keys/*" { capabilities = ["create", "read", "update"] }
path "transit/sign/*" { capabilities = ["update"] }
path "secret/data/transit/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/transit/*" { capabilities = ["read"] }
"""


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    with file_server(tmp_path_factory.mktemp("bao-disk")) as server:
        server.write_policy("signerd", POLICY)
        yield server


@pytest.fixture(autouse=True)
def healthy_again(bao: FileServer) -> Iterator[None]:
    """Each test leaves the server running, thawed and unsealed."""
    yield
    if bao.proc is None:
        bao.start()
    bao.resume()
    if bao.api("GET", "sys/seal-status", token="")["sealed"]:
        bao.unseal()


@pytest.fixture
def make(bao: FileServer) -> Iterator[Any]:
    made: list[VaultBackend] = []

    def make_backend(**overrides: Any) -> VaultBackend:
        backend = from_config(vault_backend_config(bao, **{"timeout": TIMEOUT, **overrides}))
        made.append(backend)
        return backend

    yield make_backend
    for backend in made:
        backend.close()


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("vf"), "feedback")


def approle_files(bao: FileServer, tmp_path: Path, role: str, **params: Any) -> dict[str, Any]:
    role_id, secret_id = bao.enable_approle(role, policies="signerd", **params)
    (tmp_path / "role_id").write_text(role_id)
    (tmp_path / "secret_id").write_text(secret_id)
    return {
        "token_file": None,
        "approle_role_id_file": str(tmp_path / "role_id"),
        "approle_secret_id_file": str(tmp_path / "secret_id"),
    }


def timed(call: Any) -> tuple[float, BaseException | None]:
    start = time.monotonic()
    try:
        call()
    except SignerdError as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def test_stopped_then_restarted(bao: FileServer, make: Any, key: KeyName) -> None:
    """Server down: BackendUnavailable within the timeout; back and unsealed: same object signs."""
    backend = make()
    info = backend.create(key)
    bao.stop()
    for call in (
        lambda: backend.sign(key, 1, [b"x"]),
        backend.check,
        lambda: backend.describe(key),
    ):
        elapsed, err = timed(call)
        assert type(err) is BackendUnavailable and elapsed < TIMEOUT
    bao.start()
    (sig,) = backend.sign(key, 1, [b"back"])
    assert isinstance(sig, bytes)
    Ed25519PublicKey.from_public_bytes(info.versions[0].public_key).verify(sig, b"back")
    backend.check()


def test_frozen_server_times_out(bao: FileServer, make: Any, key: KeyName) -> None:
    """A server that accepts but never answers: BackendUnavailable once the timeout is spent."""
    backend = make()
    backend.create(key)
    bao.pause()
    try:
        elapsed, err = timed(lambda: backend.sign(key, 1, [b"x"]))
    finally:
        bao.resume()
    assert type(err) is BackendUnavailable
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT * 1.5 + 0.5
    assert isinstance(backend.sign(key, 1, [b"after"])[0], bytes)


def test_sealed_is_backend_sealed(bao: FileServer, make: Any, key: KeyName) -> None:
    """Sealed: BackendSealed (its own 503) from sign, describe and check; unsealed: signs again."""
    backend = make()
    backend.create(key)
    bao.seal()
    for call in (
        lambda: backend.sign(key, 1, [b"x"]),
        backend.check,
        lambda: backend.describe(key),
    ):
        elapsed, err = timed(call)
        assert type(err) is BackendSealed and err.status == 503 and elapsed < TIMEOUT
    bao.unseal()
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)


def test_restarted_sealed_then_unsealed(bao: FileServer, make: Any, key: KeyName) -> None:
    """A restart leaves Vault sealed (BackendSealed); after unseal the same backend recovers."""
    backend = make()
    backend.create(key)
    bao.stop()
    bao.start(unseal=False)
    with pytest.raises(BackendSealed):
        backend.sign(key, 1, [b"x"])
    bao.unseal()
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)


@pytest.mark.slow
def test_short_lived_token_never_fails_a_sign(
    bao: FileServer, make: Any, key: KeyName, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AppRole tokens with a 10 s TTL and 30 s max TTL: 0 failed signs over 60 s of signing."""
    caplog.set_level(logging.INFO, logger="signerd.vault")
    role = unique("short")
    backend = make(**approle_files(bao, tmp_path, role, token_ttl="10s", token_max_ttl="30s"))
    info = backend.create(key)
    public = Ed25519PublicKey.from_public_bytes(info.versions[0].public_key)
    logins_before = bao.audited_requests("auth/approle/login")
    failures: list[str] = []
    signed = [0]
    lock = threading.Lock()
    stop = time.monotonic() + 60

    def worker(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            data = f"{n}-{i}".encode()
            try:
                results = backend.sign(key, 1, [data, data] if i % 3 == 0 else [data])
                for sig in results:
                    assert isinstance(sig, bytes), sig
                    public.verify(sig, data)
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))
            else:
                with lock:
                    signed[0] += len(results)
            i += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert failures == []
    assert signed[0] > 1000
    auth = backend.transport.auth
    # 60 s with a 30 s max TTL needs at least two fresh logins, and renewals in between
    assert auth.login_attempts >= 3 and auth.renewals >= 2
    assert bao.audited_requests("auth/approle/login") - logins_before >= 2
    # renewed and replaced ahead of time: Vault never refused a token that had run out
    assert "signerd.vault.forbidden" not in caplog.text


def test_revoked_token_file_token(bao: FileServer, make: Any, key: KeyName) -> None:
    """A revoked token: exactly one re-login (re-reading token_file), then BackendUnavailable."""
    token = bao.create_token(policies=["signerd"], ttl="1h")
    backend = make(token=token)
    backend.create(key)
    lookups = bao.audited_requests("auth/token/lookup-self")
    attempts = backend.transport.auth.login_attempts
    bao.api("POST", "auth/token/revoke", {"token": token})
    elapsed, err = timed(lambda: backend.sign(key, 1, [b"x"]))
    # on the wire plain backend_unavailable; in the daemon a refusal (exit 78 at start-up)
    assert isinstance(err, CredentialsRefused) and err.reason == "Forbidden"
    assert err.code == "backend_unavailable" and elapsed < TIMEOUT
    assert backend.transport.auth.login_attempts == attempts + 1
    assert bao.audited_requests("auth/token/lookup-self") == lookups + 1
    # the operator writes a new token to the file: the next call logs in with it
    fresh = bao.create_token(policies=["signerd"], ttl="1h")
    Path(backend.settings.source.path).write_text(fresh)
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)


def test_revoked_approle_token_with_dead_secret_id(
    bao: FileServer, make: Any, key: KeyName, tmp_path: Path
) -> None:
    """Token revoked and secret id destroyed: one AppRole login attempt, then BackendUnavailable."""
    role = unique("dead")
    files = approle_files(bao, tmp_path, role, token_ttl="1h")
    backend = make(**files)
    backend.create(key)
    secret_id = Path(files["approle_secret_id_file"]).read_text()
    bao.api("POST", f"auth/approle/role/{role}/secret-id/destroy", {"secret_id": secret_id})
    bao.api("PUT", "sys/leases/revoke-prefix/auth/approle/login", {})
    logins = bao.audited_requests("auth/approle/login")
    with pytest.raises(BackendUnavailable):
        backend.sign(key, 1, [b"x"])
    assert bao.audited_requests("auth/approle/login") == logins + 1


def test_revoked_approle_token_logs_in_again(
    bao: FileServer, make: Any, key: KeyName, tmp_path: Path
) -> None:
    """Token revoked, secret id still valid: the 403 leads to one login and the sign succeeds."""
    backend = make(**approle_files(bao, tmp_path, unique("live"), token_ttl="1h"))
    backend.create(key)
    bao.api("PUT", "sys/leases/revoke-prefix/auth/approle/login", {})
    logins = bao.audited_requests("auth/approle/login")
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)
    assert bao.audited_requests("auth/approle/login") == logins + 1
