"""The key service's settings (the ``[keys]`` table, read by ``signerd._config``)."""

from __future__ import annotations

from dataclasses import dataclass

#: ``[keys.max_active_age]``: (TENANT/NAME pattern, seconds), in the file's order
AgeRules = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Settings:
    backend_timeout: float = 5.0  # seconds a backend call may take before 503
    max_batch: int = 64  # items per coalesced backend sign call
    max_in_flight: int = 2  # concurrent batches per key version
    refresh_interval: float = 30.0  # seconds between keyring re-reads (0: never)
    unknown_kid_refresh: float = 1.0  # at most one re-read per key per this many seconds
    retain_verify_only: int = 0  # keep this many verify-only versions, retire older (0: all)
    idempotency_ttl: float = 86400.0  # seconds an admin request's Idempotency-Key is kept
    idempotency_max_entries: int = 1000  # Idempotency-Keys kept at most (the oldest go)
    max_active_age: AgeRules = ()  # an active version older than its first match is due
    deletion_wait: float = 7 * 86400.0  # seconds from a scheduled deletion to the destroy
