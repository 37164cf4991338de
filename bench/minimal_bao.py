"""``ref-minimal`` on OpenBao transit: the same server, each group signed in one transit call.

Per loop turn, the group's payloads go to transit in one POST (``input`` for
one payload, ``batch_input`` for more) on a kept-alive connection from a small
pool, written by hand and parsed by httptools, without leaving the loop; each
signature is checked with ``cryptography``. The intent records are made
durable meanwhile, as on the token. Nothing else: no retries on another node,
no re-login, no policy.
"""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .minimal import Signer, Writer


class _Connection(asyncio.Protocol):
    """One kept-alive connection to OpenBao: one request at a time."""

    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpResponseParser(self)
        self.transport: Any = None
        self.body: list[bytes] = []
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("OpenBao closed the connection"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # a malformed answer: this connection is done
            self.open = False
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(exc)
            self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.parser.get_status_code(), body))

    def request(self, raw: bytes) -> asyncio.Future[tuple[int, bytes]]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter


class BaoSigner(Signer):
    """Signs each group in one transit call, from the loop."""

    def __init__(self, addr: str, token: str, key: str, public: Any, writer: Writer) -> None:
        super().__init__(f"ref/bao-{key}", writer)
        url = urlsplit(addr)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 8200
        self.public = public
        self.head = (
            f"POST /v1/transit/sign/{key} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"X-Vault-Token: {token}\r\nContent-Type: application/json\r\n"
        ).encode()
        self.idle: list[_Connection] = []

    def sign_group(self, datas: list[bytes], signed: Callable[[list[bytes | None]], None]) -> None:
        self.loop.create_task(self._sign(datas, signed))

    async def _sign(self, datas: list[bytes], signed: Callable[[list[bytes | None]], None]) -> None:
        encoded = [base64.b64encode(d).decode() for d in datas]
        if len(encoded) == 1:
            body: dict[str, Any] = {"input": encoded[0]}
        else:
            body = {"batch_input": [{"input": e} for e in encoded]}
        out: list[bytes | None] = [None] * len(datas)
        try:
            data = json.loads(await self._post(json.dumps(body).encode()))["data"]
            results = data["batch_results"] if len(datas) > 1 else [data]
            for i, (payload, result) in enumerate(zip(datas, results, strict=True)):
                signature = base64.b64decode(result["signature"].split(":", 2)[2])
                self.public.verify(signature, payload)  # raises InvalidSignature
                out[i] = signature
        except Exception:
            pass  # every payload of the group fails: 500
        signed(out)

    async def _post(self, body: bytes) -> bytes:
        raw = self.head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        for attempt in (1, 2):  # a kept-alive connection OpenBao closed: once more, afresh
            conn = self.idle.pop() if self.idle else await self._connect()
            try:
                status, answer = await conn.request(raw)
            except ConnectionError:
                if attempt == 2:
                    raise
                continue
            if conn.open:
                self.idle.append(conn)
            if status != 200:
                raise RuntimeError(f"transit answered {status}")
            return answer
        raise AssertionError("unreachable")

    async def _connect(self) -> _Connection:
        _, conn = await self.loop.create_connection(_Connection, self.host, self.port)
        return conn


def bao_signer(addr: str, token: str, key: str, writer: Writer) -> BaoSigner:
    """The signer for transit key ``key`` (its latest version's public key read first)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    request = urllib.request.Request(
        f"{addr}/v1/transit/keys/{key}", headers={"X-Vault-Token": token}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        data = json.load(answer)["data"]
    latest = data["keys"][str(data["latest_version"])]
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(latest["public_key"]))
    return BaoSigner(addr, token, key, public, writer)
