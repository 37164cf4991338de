"""The Redis nonce store, for gateways on several hosts: ``SET key 1 NX PX ttl``.

Redis decides uniqueness atomically; the key expires by itself after the TTL.
Anything other than a clear answer within the deadline (unreachable, slow,
out of memory under ``maxmemory`` with ``noeviction``, an error reply) is
503 ``nonce_store_unavailable``: never an accept. Durability across a Redis
restart is what its persistence settings give (see the README: with
``appendonly yes`` and ``appendfsync always`` an acknowledged nonce survives a
crash of the Redis host; ``everysec`` may lose the last second).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from typing import Any

from ..errors import NonceStoreUnavailable, ReplayedNonce

__all__ = ["RedisNonceStore"]

log = logging.getLogger("signerd.federation.nonces")


class RedisNonceStore:
    def __init__(
        self, url: str, *, timeout: float = 0.5, prefix: str = "signerd:nonce:", pool: int = 64
    ) -> None:
        try:
            module: Any = importlib.import_module("redis.asyncio")
        except ImportError as exc:
            raise ValueError("needs the redis package (pip install 'signerd[redis]')") from exc
        self._errors: tuple[type[BaseException], ...] = (
            importlib.import_module("redis.exceptions").RedisError,
            OSError,
            TimeoutError,
        )
        self.timeout = timeout
        self.prefix = prefix
        connection_pool = module.BlockingConnectionPool.from_url(
            url,
            max_connections=pool,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._client = module.Redis(connection_pool=connection_pool)

    async def add(self, scope: str, nonce: str, ttl: float) -> None:
        key = f"{self.prefix}{scope}|{nonce}"
        try:
            async with asyncio.timeout(self.timeout):
                stored = await self._client.set(key, b"1", nx=True, px=max(1, int(ttl * 1000)))
        except self._errors as exc:
            log.error("signerd.nonce_store_unavailable store=redis error=%s", type(exc).__name__)
            raise NonceStoreUnavailable() from exc
        if not stored:
            raise ReplayedNonce()

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._client.aclose()
