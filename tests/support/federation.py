"""Shared pieces of the federation tests: a producer key, envelope builders, daemons, Redis."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.testing import ALL_OPERATIONS

from ..conftest import DaemonProcess, start_daemon
from .rawhttp import Reply, request

#: RFC 8032 section 7.1, TEST 1
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def fresh_nonce() -> str:
    return b64url(os.urandom(16))


@dataclass(frozen=True)
class Producer:
    """A peer's key that signerd never holds: the tests sign with it directly."""

    kid: str
    key: Ed25519PrivateKey

    @classmethod
    def new(cls, kid: str, seed: bytes | None = None) -> Producer:
        key = (
            Ed25519PrivateKey.from_private_bytes(seed)
            if seed is not None
            else Ed25519PrivateKey.generate()
        )
        return cls(kid, key)

    def jwk(self) -> dict[str, str]:
        raw = self.key.public_key().public_bytes_raw()
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}

    def telemetry(
        self,
        tenant: str,
        body: bytes,
        *,
        timestamp: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        n = nonce or fresh_nonce()
        sig = self.key.sign(f"{ts}.{n}.".encode() + body)
        return {
            "tenant": tenant,
            "kid": self.kid,
            "timestamp": ts,
            "nonce": n,
            "body": b64(body),
            "signature": b64(sig),
        }

    def feedback(
        self,
        tenant: str,
        schema: str,
        data: Any,
        *,
        signed_at: int | None = None,
        nonce: str | None = None,
    ) -> dict[str, Any]:
        ts = str(int(time.time()) if signed_at is None else signed_at)
        n = nonce or fresh_nonce()
        message = f"{tenant}|{ts}|{n}|{schema}|{self.kid}|".encode() + rfc8785.dumps(data)
        return {
            "tenant": tenant,
            "signed_at": ts,
            "nonce": n,
            "schema": schema,
            "kid": self.kid,
            "data": data,
            "signature": b64(self.key.sign(message)),
        }


def allow_all() -> dict[str, Any]:
    return {
        "rules": [
            {
                "name": "t",
                "uids": [os.getuid()],
                "tenants": ["*"],
                "operations": list(ALL_OPERATIONS),
            }
        ]
    }


def federation_daemon(
    base: Path, federation: dict[str, Any] | None = None, **kw: Any
) -> DaemonProcess:
    fed = {"state_dir": str(base / "state")}
    fed.update(federation or {})
    kw.setdefault("policy", allow_all())
    return start_daemon(base, federation=fed, **kw)


class Api:
    def __init__(self, d: DaemonProcess) -> None:
        self.sock = str(d.socket_path)

    def __call__(self, method: str, url: str, body: Any = None, **kw: Any) -> Reply:
        return request(self.sock, method, url, body, **kw)

    def ok(self, method: str, url: str, body: Any = None, status: int = 200) -> Any:
        reply = self(method, url, body)
        assert reply.status == status, reply.body
        return reply.json

    def trust(self, tenant: str, producer: Producer) -> None:
        self.ok(
            "POST",
            "/v1/trusted-keys",
            {"tenant": tenant, "kid": producer.kid, "jwk": producer.jwk()},
            status=201,
        )


def assert_replays_across(
    a: DaemonProcess, b: DaemonProcess, tenant: str, kid: str, rounds: int
) -> None:
    """With a fresh producer trusted on both, each of ``rounds`` envelopes is accepted through
    ``a`` and then refused 409 replayed_nonce through ``b``."""
    producer = Producer.new(kid)
    for host in (a, b):
        Api(host).trust(tenant, producer)
    for _ in range(rounds):
        env = producer.telemetry(tenant, b'{"n":1}')
        Api(a).ok("POST", "/v1/telemetry/verify", env)
        reply = Api(b)("POST", "/v1/telemetry/verify", env)
        assert (reply.status, reply.code) == (409, "replayed_nonce")


async def post_many(sock: str, url: str, body: Any, count: int) -> list[tuple[int, str | None]]:
    """``count`` concurrent POSTs of one body over 100 connections (under the per-uid cap); (status, code) of each."""
    return await post_each(sock, url, [body] * count)


async def post_each(sock: str, url: str, bodies: list[Any]) -> list[tuple[int, str | None]]:
    """Every body POSTed at once over up to 100 connections; (status, code) of each, in order."""
    connector = aiohttp.UnixConnector(path=sock, limit=100)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(body: Any) -> tuple[int, str | None]:
            async with session.post(f"http://signerd{url}", json=body) as resp:
                doc = await resp.json()
                return resp.status, (doc.get("error") or {}).get("code")

        return list(await asyncio.gather(*(one(body) for body in bodies)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    proc: subprocess.Popen[bytes]
    base: Path | None = None
    extra: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(self.port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip()

    def kill(self) -> None:
        """SIGKILL redis-server (a crash: nothing flushed that was not already)."""
        self.proc.kill()
        self.proc.wait(timeout=10)

    def start_again(self) -> None:
        """Start redis-server again on the same port and directory (it reloads its AOF)."""
        assert self.base is not None
        self.proc = _spawn_redis(self.base, self.port, self.extra)
        if not _answers(self):
            raise RuntimeError("redis-server did not start again")


def _spawn_redis(base: Path, port: int, extra: tuple[str, ...]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(base),
            "--save",
            "",
            "--appendonly",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _answers(server: RedisServer) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and server.proc.poll() is None:
        with contextlib.suppress(subprocess.SubprocessError):
            if server.cli("PING") == "PONG":
                return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def redis_server(base: Path, *extra: str) -> Iterator[RedisServer]:
    """A real redis-server on a loopback ephemeral port with its own directory; stopped after."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (make system installs it)")
    base.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = free_port()
        server = RedisServer(port, _spawn_redis(base, port, extra), base, extra)
        if _answers(server):
            break
        server.proc.kill()
        server.proc.wait(timeout=5)
    else:
        raise RuntimeError("redis-server did not start")
    try:
        yield server
    finally:
        proc = server.proc
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
