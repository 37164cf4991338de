"""Where admin requests with an ``Idempotency-Key`` are remembered, across workers.

One row per (caller uid, key), under the SHA-256 of both (the key itself is
never stored, logged or echoed): the request's fingerprint (what it asked, as
a hash), its request id, its target (a key or a trusted peer kid), the state
of the target before the change, and, once the change is done, the answer
(status, and the body when it is at most ``MAX_BODY`` bytes) and the kid the
audit record names. A row without an answer is an intent: its request was
acting. Rows are kept ``ttl`` seconds and at most ``max_entries`` of them
(the oldest go first).

A SQLite file in the runtime directory (``.signerd-idempotency.db``), opened
per operation in a thread, so each worker uses it without sharing a
connection; callers hold the admin lock, which orders them. Without a path
(a server built in a test) the rows live in this process only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import BackendUnavailable

__all__ = ["MAX_BODY", "Entry", "IdempotencyStore"]

MAX_BODY = 16384  # answers larger than this are rebuilt from the target when replayed
_TIMEOUT = 5.0  # seconds one store operation may take
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS entries (scope TEXT PRIMARY KEY NOT NULL, "
    "created REAL NOT NULL, target TEXT NOT NULL, kind TEXT NOT NULL, "
    "fingerprint TEXT NOT NULL, request_id TEXT NOT NULL, before TEXT NOT NULL, "
    "status INTEGER, body BLOB, kid TEXT)"
)
_COLUMNS = "scope, created, target, kind, fingerprint, request_id, before, status, body, kid"
_SLOTS = ",".join("?" * 10)


@dataclass(frozen=True)
class Entry:
    scope: str  # sha256 of the caller's uid and the key
    created: float
    target: str  # "key TENANT/NAME" or "trust TENANT KID"
    kind: str  # create, rotate, promote, retire, destroy, trust-add, trust-retire
    fingerprint: str  # sha256 of what the request asked
    request_id: str
    before: Any  # JSON: the target's state before the change
    status: int | None = None  # None: an intent, its request never finished
    body: bytes | None = None
    kid: str | None = None


def _row(row: tuple[Any, ...]) -> Entry:
    scope, created, target, kind, fingerprint, rid, before, status, body, kid = row
    return Entry(
        scope, created, target, kind, fingerprint, rid, json.loads(before), status, body, kid
    )


class IdempotencyStore:
    def __init__(self, path: str | None, *, ttl: float = 86400.0, max_entries: int = 1000) -> None:
        self.path = path
        self.ttl = ttl
        self.max_entries = max_entries
        self._memory: dict[str, Entry] = {}
        self._lock = threading.Lock()  # this process's threads, one at a time
        self._ready = False

    # --- what callers use (each raises BackendUnavailable when the store fails) ---

    async def get(self, scope: str) -> Entry | None:
        return await self._call(lambda: self._get(scope))

    async def intents(self, target: str) -> list[Entry]:
        """Rows of ``target`` without an answer (their requests ended while acting)."""
        return await self._call(lambda: self._intents(target))

    async def begin(self, entry: Entry) -> None:
        await self._call(lambda: self._put(entry))

    async def finish(self, entry: Entry, status: int, body: bytes, kid: str | None) -> None:
        kept = body if len(body) <= MAX_BODY else None
        done = dataclasses.replace(entry, status=status, body=kept, kid=kid)
        await self._call(lambda: self._put(done))

    async def forget(self, scope: str) -> None:
        await self._call(lambda: self._forget(scope))

    # --- blocking parts, in a thread ---

    async def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            async with asyncio.timeout(_TIMEOUT):
                return await asyncio.to_thread(self._locked, fn)
        except (TimeoutError, OSError, sqlite3.Error, ValueError) as exc:
            raise BackendUnavailable("the idempotency store cannot be used now") from exc

    def _locked(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            return fn()

    @contextlib.contextmanager
    def _db(self) -> Any:
        assert self.path is not None
        if not self._ready:  # created 0600 before SQLite opens it (no umask, no symlink)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(fd)
        conn = sqlite3.connect(self.path, timeout=_TIMEOUT, isolation_level=None)
        try:
            if not self._ready:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(_SCHEMA)
                conn.execute("CREATE INDEX IF NOT EXISTS entries_target ON entries(target)")
                conn.execute("CREATE INDEX IF NOT EXISTS entries_created ON entries(created)")
                self._ready = True
            conn.execute("PRAGMA synchronous=FULL")
            yield conn
        finally:
            conn.close()

    def _absent(self) -> bool:
        """No file yet: nothing was ever stored (reading does not create it)."""
        return self.path is not None and not self._ready and not os.path.exists(self.path)

    def _get(self, scope: str) -> Entry | None:
        oldest = time.time() - self.ttl
        if self._absent():
            return None
        if self.path is None:
            found = self._memory.get(scope)
        else:
            with self._db() as conn:
                row = conn.execute(
                    f"SELECT {_COLUMNS} FROM entries WHERE scope = ?", (scope,)
                ).fetchone()
            found = None if row is None else _row(row)
        return found if found is not None and found.created >= oldest else None

    def _intents(self, target: str) -> list[Entry]:
        oldest = time.time() - self.ttl
        if self._absent():
            return []
        if self.path is None:
            rows = sorted(
                (e for e in self._memory.values() if e.target == target), key=lambda e: e.created
            )
        else:
            with self._db() as conn:
                rows = [
                    _row(r)
                    for r in conn.execute(
                        f"SELECT {_COLUMNS} FROM entries WHERE target = ? AND status IS NULL "
                        "ORDER BY created",
                        (target,),
                    )
                ]
        return [e for e in rows if e.status is None and e.created >= oldest]

    def _put(self, entry: Entry) -> None:
        oldest = time.time() - self.ttl
        if self.path is None:
            self._memory[entry.scope] = entry
            for scope in [s for s, e in self._memory.items() if e.created < oldest]:
                del self._memory[scope]
            while len(self._memory) > self.max_entries:
                del self._memory[min(self._memory, key=lambda s: self._memory[s].created)]
            return
        values = (
            entry.scope,
            entry.created,
            entry.target,
            entry.kind,
            entry.fingerprint,
            entry.request_id,
            json.dumps(entry.before),
            entry.status,
            entry.body,
            entry.kid,
        )
        with self._db() as conn:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"INSERT OR REPLACE INTO entries ({_COLUMNS}) VALUES ({_SLOTS})", values)
            conn.execute("DELETE FROM entries WHERE created < ?", (oldest,))
            conn.execute(
                "DELETE FROM entries WHERE scope IN (SELECT scope FROM entries "
                "ORDER BY created DESC LIMIT -1 OFFSET ?)",
                (self.max_entries,),
            )
            conn.execute("COMMIT")

    def _forget(self, scope: str) -> None:
        if self.path is None:
            self._memory.pop(scope, None)
            return
        with self._db() as conn:
            conn.execute("DELETE FROM entries WHERE scope = ?", (scope,))

    def count(self) -> int:
        """Rows kept (for tests and the bound)."""
        if self.path is None:
            return len(self._memory)
        with self._lock, self._db() as conn:
            return int(conn.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
