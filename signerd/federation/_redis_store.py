"""The Redis nonce store, for gateways on several hosts: ``SET key 1 NX PX ttl``.

Redis decides uniqueness atomically; the key expires by itself after the TTL.
Anything other than a clear answer within the deadline (unreachable, slow,
out of memory under ``maxmemory`` with ``noeviction``, an error reply) is
503 ``nonce_store_unavailable``: never an accept. Durability across a Redis
restart is what its persistence settings give (see docs/federation.md, "Nonce stores": with
``appendonly yes`` and ``appendfsync always`` an acknowledged nonce survives a
crash of the Redis host; ``everysec`` may lose the last second).

With ``max_entries_per_tenant``, each tenant's live nonces are also listed in
a sorted set (``prefix + "tenant:" + TENANT``, scored by expiry in Redis's own
clock) and one script does the whole step atomically in Redis: a live key is
a replay; otherwise the tenant's expired members are dropped, a tenant at its
share is refused (503), and the key and its member are written. Every
gateway sharing the Redis counts against the same sets. The bound on all
tenants together is Redis's ``maxmemory``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
from typing import Any

from ..errors import NonceStoreUnavailable, ReplayedNonce

__all__ = ["RedisNonceStore"]

log = logging.getLogger("signerd.federation.nonces")

#: KEYS: the nonce, the tenant's set; ARGV: ttl (ms), the share. 1 added, 0 replay, -1 full.
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return -1 end
redis.call('SET', KEYS[1], '1', 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""


class RedisNonceStore:
    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.5,
        prefix: str = "signerd:nonce:",
        pool: int = 64,
        max_entries_per_tenant: int | None = None,
    ) -> None:
        try:
            module: Any = importlib.import_module("redis.asyncio")
        except ImportError as exc:
            raise ValueError(
                "needs the redis package (the 'redis' extra of the signerd wheel)"
            ) from exc
        self._errors: tuple[type[BaseException], ...] = (
            importlib.import_module("redis.exceptions").RedisError,
            OSError,
            TimeoutError,
        )
        self.timeout = timeout
        self.prefix = prefix
        self.max_entries_per_tenant = max_entries_per_tenant
        self._last_full_log = 0.0
        connection_pool = module.BlockingConnectionPool.from_url(
            url,
            max_connections=pool,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )
        self._client = module.Redis(connection_pool=connection_pool)
        self._add = self._client.register_script(_ADD)

    async def add(self, scope: str, nonce: str, ttl: float, *, tenant: str = "") -> None:
        key = f"{self.prefix}{scope}|{nonce}"
        px = max(1, int(ttl * 1000))
        share = self.max_entries_per_tenant
        try:
            async with asyncio.timeout(self.timeout):
                if share is None:
                    stored = 1 if await self._client.set(key, b"1", nx=True, px=px) else 0
                else:
                    tenant_set = f"{self.prefix}tenant:{tenant}"
                    stored = int(await self._add(keys=[key, tenant_set], args=[px, share]))
        except self._errors as exc:
            log.error("signerd.nonce_store_unavailable store=redis error=%s", type(exc).__name__)
            raise NonceStoreUnavailable() from exc
        if stored == 0:
            raise ReplayedNonce()
        if stored < 0:
            if time.monotonic() - self._last_full_log >= 1.0:  # once a second
                self._last_full_log = time.monotonic()
                log.error("signerd.nonce_store_full store=redis bound=tenant max=%d", share)
            raise NonceStoreUnavailable("this tenant's share of nonces is full")

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._client.aclose()
