"""Nonce stores: record a nonce once, atomically, durably, within a bound.

``NonceStore.add(scope, nonce, ttl, tenant=T)`` returns when the nonce is
recorded and durable, raises ``ReplayedNonce`` when it is already recorded and
unexpired, and ``NonceStoreUnavailable`` when the store cannot answer in time
or is full. It never answers "recorded" without having recorded. The scope is
the signer's public key (its RFC 7638 thumbprint, see ``routes``); the tenant
is who the entry is counted against.

``SqliteNonceStore`` is the default: one SQLite file in WAL mode with
``synchronous=FULL``, a primary key on (scope, nonce), expiry stamps in
wall-clock seconds (they survive a restart), and two bounds on the live
entries: ``max_entries`` for the file as a whole and ``max_entries_per_tenant``
for each tenant, so one tenant at its share leaves room for the others. When a
bound is reached new nonces are refused with 503; live nonces are never
evicted. The counts live in the file beside the rows (a table kept by
triggers) and are read inside the write transaction, which SQLite gives one
writer at a time: every worker of a daemon, and every daemon sharing the file,
sees the same exact counts. One writer thread per process applies whatever is
queued in one transaction and one commit (group commit); each caller is
answered only after the commit that holds its nonce.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from ..errors import NonceStoreUnavailable, ReplayedNonce

__all__ = ["NonceStore", "SqliteNonceStore"]

log = logging.getLogger("signerd.federation.nonces")

_PURGE_EVERY = 1.0  # seconds between sweeps of expired entries
_PURGE_BATCH = 10_000
_TOTAL = "*"  # the counts row of the whole file (no tenant name holds a '*')

#: the rows, the live count per tenant and in all, and the triggers that keep the counts
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS seen "
    "(k TEXT PRIMARY KEY NOT NULL, tenant TEXT NOT NULL, expires REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS seen_expires ON seen(expires)",
    "CREATE TABLE IF NOT EXISTS counts (tenant TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL)",
    "CREATE TRIGGER IF NOT EXISTS seen_added AFTER INSERT ON seen BEGIN "
    f"INSERT INTO counts (tenant, n) VALUES (NEW.tenant, 1), ('{_TOTAL}', 1) "
    "ON CONFLICT(tenant) DO UPDATE SET n = n + 1; END",
    "CREATE TRIGGER IF NOT EXISTS seen_removed AFTER DELETE ON seen BEGIN "
    f"UPDATE counts SET n = n - 1 WHERE tenant IN (OLD.tenant, '{_TOTAL}'); END",
    "DROP TABLE IF EXISTS nonces",  # the rows of a version that scoped nonces by tenant and kid
)


class NonceStore(Protocol):
    async def add(self, scope: str, nonce: str, ttl: float, *, tenant: str = "") -> None: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    key: str
    tenant: str
    ttl: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    outcome: str = "unavailable"  # "ok", "replayed", "full", "unavailable"


_OUTCOMES: dict[str, type[Exception] | None] = {
    "ok": None,
    "replayed": ReplayedNonce,
    "full": NonceStoreUnavailable,
    "tenant_full": NonceStoreUnavailable,
    "unavailable": NonceStoreUnavailable,
}


def _settle(job: _Job) -> None:
    if job.future.done():
        return
    error = _OUTCOMES[job.outcome]
    if error is None:
        job.future.set_result(None)
    elif job.outcome == "full":
        job.future.set_exception(NonceStoreUnavailable("the nonce store is full"))
    elif job.outcome == "tenant_full":
        job.future.set_exception(NonceStoreUnavailable("this tenant's share of nonces is full"))
    else:
        job.future.set_exception(error())


class SqliteNonceStore:
    def __init__(
        self,
        path: str,
        *,
        max_entries: int,
        max_entries_per_tenant: int | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_entries_per_tenant = (
            max_entries if max_entries_per_tenant is None else max_entries_per_tenant
        )
        self.timeout = timeout
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._closing = False
        self._conn: sqlite3.Connection | None = None
        self._last_purge = 0.0
        self._last_full_log = 0.0
        self.commits = 0  # for tests and the benchmark: how many commits served the adds
        self._thread = threading.Thread(target=self._run, name="signerd-nonces", daemon=True)
        self._thread.start()

    # --- the event-loop side ------------------------------------------------

    async def add(self, scope: str, nonce: str, ttl: float, *, tenant: str = "") -> None:
        loop = asyncio.get_running_loop()
        job = _Job(f"{scope}|{nonce}", tenant, ttl, loop, loop.create_future())
        with self._cond:
            if self._closing:
                raise NonceStoreUnavailable()
            self._queue.append(job)
            self._cond.notify()
        try:
            await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except TimeoutError as exc:
            log.error("signerd.nonce_store_slow timeout=%.3f", self.timeout)
            raise NonceStoreUnavailable("the nonce store did not answer in time") from exc

    async def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.to_thread(self._thread.join, 10.0)

    def entries(self, tenant: str | None = None) -> int:
        """Live and expired rows in the file, or of one tenant (for tests and metrics; opens its
        own connection and counts the rows themselves, not the counts table)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=5.0)) as conn:
            if tenant is None:
                return int(conn.execute("SELECT COUNT(*) FROM seen").fetchone()[0])
            row = conn.execute("SELECT COUNT(*) FROM seen WHERE tenant = ?", (tenant,)).fetchone()
            return int(row[0])

    # --- the writer thread --------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                batch, self._queue = self._queue, []
                closing = self._closing
            if batch:
                try:
                    self._apply(batch)
                except Exception:  # never let the writer die: refuse this batch instead
                    log.exception("signerd.nonce_store_error")
                    for job in batch:
                        job.outcome = "unavailable"
                for job in batch:
                    with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                        job.loop.call_soon_threadsafe(_settle, job)
            if closing and not batch:
                break
        if self._conn is not None:
            self._conn.close()

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o750, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA journal_size_limit=8388608")
                conn.execute("BEGIN IMMEDIATE")  # the workers open the file at the same time
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("COMMIT")
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _apply(self, batch: list[_Job]) -> None:
        """Commit ``batch``; a file another worker holds locked is tried once more."""
        for attempt in (1, 2):
            busy = self._apply_once(batch, last=attempt == 2)
            if not busy:
                return

    def _apply_once(self, batch: list[_Job], *, last: bool) -> bool:
        """One transaction for ``batch``; True when it should be tried again (busy)."""
        try:
            conn = self._open()
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._maybe_purge(conn, now)
                for job in batch:
                    job.outcome = self._insert(conn, job, now)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self.commits += 1
        except (sqlite3.Error, OSError) as exc:
            if not last and isinstance(exc, sqlite3.OperationalError) and _busy(exc):
                log.warning("signerd.nonce_store_busy retrying=1")
                return True
            log.error("signerd.nonce_store_error error=%s", type(exc).__name__)
            for job in batch:
                job.outcome = "unavailable"
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None  # reopen on the next batch
        return False

    def _insert(self, conn: sqlite3.Connection, job: _Job, now: float) -> str:
        row = conn.execute("SELECT expires FROM seen WHERE k = ?", (job.key,)).fetchone()
        if row is not None:
            if row[0] > now:
                return "replayed"
            conn.execute("DELETE FROM seen WHERE k = ?", (job.key,))  # expired: taken over
        full = self._full(conn, job.tenant)
        if full is not None:
            self._purge(conn, now)
            full = self._full(conn, job.tenant)
        if full is not None:
            if time.monotonic() - self._last_full_log >= _PURGE_EVERY:  # once a second
                self._last_full_log = time.monotonic()
                log.error(
                    "signerd.nonce_store_full bound=%s max_entries=%d max_entries_per_tenant=%d",
                    "tenant" if full == "tenant_full" else "total",
                    self.max_entries,
                    self.max_entries_per_tenant,
                )
            return full
        conn.execute(
            "INSERT INTO seen (k, tenant, expires) VALUES (?, ?, ?)",
            (job.key, job.tenant, now + job.ttl),
        )
        return "ok"

    def _full(self, conn: sqlite3.Connection, tenant: str) -> str | None:
        """Which bound a new entry of ``tenant`` would cross ("full", "tenant_full"), or None."""
        counts = dict(
            conn.execute(
                "SELECT tenant, n FROM counts WHERE tenant IN (?, ?)", (tenant, _TOTAL)
            ).fetchall()
        )
        if counts.get(_TOTAL, 0) >= self.max_entries:
            return "full"
        if counts.get(tenant, 0) >= self.max_entries_per_tenant:
            return "tenant_full"
        return None

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        if time.monotonic() - self._last_purge >= _PURGE_EVERY:
            self._purge(conn, now)

    def _purge(self, conn: sqlite3.Connection, now: float) -> None:
        self._last_purge = time.monotonic()
        cur = conn.execute(
            "DELETE FROM seen WHERE k IN "
            "(SELECT k FROM seen WHERE expires <= ? ORDER BY expires LIMIT ?)",
            (now, _PURGE_BATCH),
        )
        if cur.rowcount > 0:
            conn.execute(f"DELETE FROM counts WHERE n <= 0 AND tenant != '{_TOTAL}'")


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another process holds the file for longer than the timeout."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc)
