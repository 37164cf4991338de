"""The Redis nonce store, for gateways on several hosts: ``SET key 1 NX PX ttl``.

Redis decides uniqueness atomically; the key expires by itself after the TTL.
Anything other than a clear answer within the deadline (unreachable, slow,
out of memory under ``maxmemory`` with ``noeviction``, an error reply) is
503 ``nonce_store_unavailable``: never an accept. Durability across a Redis
restart is what its persistence settings give (see docs/federation.md, "Nonce stores": with
``appendonly yes`` and ``appendfsync always`` an acknowledged nonce survives a
crash of the Redis host; ``everysec`` may lose the last second).

With a bound (``max_entries`` for all tenants together, ``max_entries_per_tenant``
for each), the live nonces are also listed in sorted sets (``prefix + "all"``
and ``prefix + "tenant:" + TENANT``, scored by expiry in Redis's own clock) and
one script does the whole step atomically in Redis: a live key is a replay;
otherwise expired members are dropped, a store at ``max_entries`` or a tenant
at its share is refused (503), and the key and its members are written. Every
worker of a daemon, and every daemon sharing the Redis, counts against the
same sets, so the bounds hold for them all together (Redis's ``maxmemory``
stays the last resort).
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

_BIG = 2**53  # no bound (Lua numbers are doubles)

#: KEYS: the nonce, the tenant's set, the set of all; ARGV: ttl (ms), the tenant's share,
#: the total. 1 added, 0 replay, -1 the tenant's share full, -2 the store full.
_ADD = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[3]) then return -2 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[2]) then return -1 end
redis.call('SET', KEYS[1], '1', 'PX', ttl)
redis.call('ZADD', KEYS[2], now + ttl, KEYS[1])
redis.call('ZADD', KEYS[3], now + ttl, KEYS[1])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
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
        max_entries: int | None = None,
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
        self.max_entries = max_entries
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
        share, total = self.max_entries_per_tenant, self.max_entries
        try:
            async with asyncio.timeout(self.timeout):
                if share is None and total is None:
                    stored = 1 if await self._client.set(key, b"1", nx=True, px=px) else 0
                else:
                    sets = [f"{self.prefix}tenant:{tenant}", f"{self.prefix}all"]
                    bounds = [_BIG if share is None else share, _BIG if total is None else total]
                    stored = int(await self._add(keys=[key, *sets], args=[px, *bounds]))
        except self._errors as exc:
            log.error("signerd.nonce_store_unavailable store=redis error=%s", type(exc).__name__)
            raise NonceStoreUnavailable() from exc
        if stored == 0:
            raise ReplayedNonce()
        if stored < 0:
            whole = stored == -2
            if time.monotonic() - self._last_full_log >= 1.0:  # once a second
                self._last_full_log = time.monotonic()
                log.error(
                    "signerd.nonce_store_full store=redis bound=%s max=%d",
                    "all" if whole else "tenant",
                    total if whole else share,
                )
            if whole:
                raise NonceStoreUnavailable("the nonce store is full")
            raise NonceStoreUnavailable("this tenant's share of nonces is full")

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._client.aclose()
