"""Federation verify throughput: signerd's /v1/telemetry/verify against an in-process
verify with the same nonce store.

Every operation builds a fresh telemetry envelope (a unique nonce, a small
JSON body, an Ed25519 signature by a producer key the daemon trusts) and has
it verified. The in-process reference does what the endpoint does after the
HTTP layer: the strict parse of the request, the field checks, the signature
check with ``cryptography``, the timestamp check and ``store.add`` on a store
of the same kind (its own SQLite file; the same Redis with its own prefix).
Both sides pay the same envelope construction in the caller. The difference
is what the daemon costs: HTTP, routing, the policy, the audit record.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .load import Op
from .services import ServiceError, _stop
from .wire import HttpConnection, WireError

#: the producer's key (RFC 8032 TEST 1 seed: a public test key, never a secret)
SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
TENANT = "benchfed"
KID = "bench-producer-1"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _envelope(key: Ed25519PrivateKey, i: int) -> bytes:
    ts = str(int(time.time()))
    nonce = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode()
    body = json.dumps({"seq": i, "cpu": 0.25, "host": "bench"}).encode()
    signature = key.sign(f"{ts}.{nonce}.".encode() + body)
    doc = {
        "tenant": TENANT,
        "kid": KID,
        "timestamp": ts,
        "nonce": nonce,
        "body": _b64(body),
        "signature": _b64(signature),
    }
    return json.dumps(doc).encode()


def public_jwk() -> dict[str, str]:
    raw = Ed25519PrivateKey.from_private_bytes(SEED).public_key().public_bytes_raw()
    x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    return {"kty": "OKP", "crv": "Ed25519", "x": x}


def trust_producer(sock: str) -> None:
    conn = HttpConnection(sock)
    try:
        conn.json(
            "POST", "/v1/trusted-keys", {"tenant": TENANT, "kid": KID, "jwk": public_jwk()}, 201
        )
    finally:
        conn.close()


def federation_config(state_dir: Path, store: str, redis_url: str) -> dict[str, Any]:
    """signerd's ``[federation]`` table with its nonce store."""
    nonces = {"store": store, "url": redis_url, "timeout": 5.0, "max_entries": 10000000}
    return {"state_dir": str(state_dir), "nonces": nonces}


@dataclass(frozen=True)
class SignerdTelemetryVerify:
    """POST /v1/telemetry/verify of a fresh envelope over a keep-alive connection."""

    socket: str

    def open(self) -> Op:
        key = Ed25519PrivateKey.from_private_bytes(SEED)
        conn = HttpConnection(self.socket)

        def op(i: int) -> object:
            status, answer = conn.request("POST", "/v1/telemetry/verify", _envelope(key, i))
            if status != 200:
                raise WireError(f"HTTP {status} {answer[:120]!r}")
            return None

        return op


class _Shared:
    """One event loop thread and one store per worker process (as in one daemon process)."""

    lock = threading.Lock()
    instances: dict[tuple[str, str], _Shared] = {}

    def __init__(self, store: str, where: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def make() -> Any:
            if store == "redis":
                from signerd.federation._redis_store import RedisNonceStore

                return RedisNonceStore(where, timeout=5.0, prefix="signerd:bench-ref:")
            from signerd.federation._nonces import SqliteNonceStore

            return SqliteNonceStore(where, max_entries=10_000_000, timeout=5.0)

        self.store = asyncio.run_coroutine_threadsafe(make(), self.loop).result(30)

    @classmethod
    def get(cls, store: str, where: str) -> _Shared:
        with cls.lock:
            shared = cls.instances.get((store, where))
            if shared is None:
                shared = cls.instances[(store, where)] = cls(store, where)
            return shared


@dataclass(frozen=True)
class InprocTelemetryVerify:
    """The verification steps in process, with a nonce store of the same kind."""

    store: str  # "sqlite" or "redis"
    where: str  # SQLite file or Redis URL

    def open(self) -> Op:
        from signerd.wire import (
            b64decode,
            check_nonce,
            check_tenant,
            check_timestamp,
            parse_json,
            telemetry_input,
        )

        key = Ed25519PrivateKey.from_private_bytes(SEED)
        public = key.public_key()
        shared = _Shared.get(self.store, self.where)

        async def verify(raw: bytes) -> None:
            body = parse_json(raw, max_bytes=1 << 20, max_depth=2)
            tenant = check_tenant(body["tenant"])
            signed = check_timestamp(body["timestamp"])
            nonce = check_nonce(body["nonce"])
            message = telemetry_input(body["timestamp"], nonce, b64decode(body, "body"))
            public.verify(b64decode(body, "signature"), message)
            if abs(time.time() - signed) > 300:
                raise ValueError("stale")
            await shared.store.add(f"{tenant}|{body['kid']}", nonce, 600.0)

        def op(i: int) -> object:
            future: Future[None] = asyncio.run_coroutine_threadsafe(
                verify(_envelope(key, i)), shared.loop
            )
            future.result(30)
            return None

        return op


@dataclass
class Redis:
    url: str
    proc: subprocess.Popen[bytes]


def start_redis(stack: ExitStack, tmp: Path) -> Redis:
    """A redis-server on a loopback ephemeral port, RDB and AOF off, stopped by ``stack``."""
    from .services import free_port_pair

    binary = shutil.which("redis-server")
    if binary is None:
        raise ServiceError("redis-server is not installed (make system installs it)")
    directory = tmp / "redis"
    directory.mkdir(exist_ok=True)
    port = free_port_pair()
    proc = subprocess.Popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stack.callback(_stop, proc)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"redis-server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return Redis(f"redis://127.0.0.1:{port}/0", proc)
        time.sleep(0.05)
    raise ServiceError("redis-server did not answer PING")
