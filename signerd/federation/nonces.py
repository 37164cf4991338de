"""Nonce stores: record a nonce once, atomically, durably, within a bound.

``NonceStore.add(scope, nonce, ttl)`` returns when the nonce is recorded and
durable, raises ``ReplayedNonce`` when it is already recorded and unexpired,
and ``NonceStoreUnavailable`` when the store cannot answer in time or is full.
It never answers "recorded" without having recorded.

``SqliteNonceStore`` is the default: one SQLite file in WAL mode with
``synchronous=FULL``, a primary key on (scope, nonce) so the insert itself is
the uniqueness check, expiry stamps in wall-clock seconds (they survive a
restart), and a bound on the number of live entries (when full, new nonces are
refused with 503; live nonces are never evicted). One writer thread applies
whatever is queued in one transaction and one commit (group commit); each
caller is answered only after the commit that holds its nonce.
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
_RECOUNT_EVERY = 10.0  # other processes may share the file: re-read the count this often


class NonceStore(Protocol):
    async def add(self, scope: str, nonce: str, ttl: float) -> None: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class _Job:
    key: str
    ttl: float
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    outcome: str = "unavailable"  # "ok", "replayed", "full", "unavailable"


_OUTCOMES: dict[str, type[Exception] | None] = {
    "ok": None,
    "replayed": ReplayedNonce,
    "full": NonceStoreUnavailable,
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
    else:
        job.future.set_exception(error())


class SqliteNonceStore:
    def __init__(self, path: str, *, max_entries: int, timeout: float = 2.0) -> None:
        self.path = path
        self.max_entries = max_entries
        self.timeout = timeout
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._closing = False
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self._last_purge = 0.0
        self._last_count = 0.0
        self._last_full_log = 0.0
        self.commits = 0  # for tests and the benchmark: how many commits served the adds
        self._thread = threading.Thread(target=self._run, name="signerd-nonces", daemon=True)
        self._thread.start()

    # --- the event-loop side ------------------------------------------------

    async def add(self, scope: str, nonce: str, ttl: float) -> None:
        loop = asyncio.get_running_loop()
        job = _Job(f"{scope}|{nonce}", ttl, loop, loop.create_future())
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

    def entries(self) -> int:
        """Live and expired rows in the file (for tests and metrics; opens its own connection)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=5.0)) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM nonces").fetchone()[0])

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
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS nonces "
                    "(k TEXT PRIMARY KEY NOT NULL, expires REAL NOT NULL)"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS nonces_expires ON nonces(expires)")
                self._count = int(conn.execute("SELECT COUNT(*) FROM nonces").fetchone()[0])
            except sqlite3.Error:
                conn.close()
                raise
            self._conn = conn
            self._last_count = time.monotonic()
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
            self._count = 0
            if self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None  # reopen on the next batch
        return False

    def _insert(self, conn: sqlite3.Connection, job: _Job, now: float) -> str:
        expires = now + job.ttl
        if self._count >= self.max_entries:
            self._purge(conn, now, recount=time.monotonic() - self._last_count >= _PURGE_EVERY)
            if self._count >= self.max_entries:
                row = conn.execute("SELECT expires FROM nonces WHERE k = ?", (job.key,)).fetchone()
                if row is not None and row[0] > now:
                    return "replayed"
                if time.monotonic() - self._last_full_log >= _PURGE_EVERY:  # once a second
                    self._last_full_log = time.monotonic()
                    log.error("signerd.nonce_store_full max_entries=%d", self.max_entries)
                return "full"
        try:
            conn.execute("INSERT INTO nonces (k, expires) VALUES (?, ?)", (job.key, expires))
        except sqlite3.IntegrityError:
            cur = conn.execute(
                "UPDATE nonces SET expires = ? WHERE k = ? AND expires <= ?",
                (expires, job.key, now),
            )
            return "ok" if cur.rowcount == 1 else "replayed"
        self._count += 1
        return "ok"

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        if time.monotonic() - self._last_purge >= _PURGE_EVERY:
            recount = time.monotonic() - self._last_count >= _RECOUNT_EVERY
            self._purge(conn, now, recount=recount)

    def _purge(self, conn: sqlite3.Connection, now: float, *, recount: bool) -> None:
        self._last_purge = time.monotonic()
        cur = conn.execute(
            "DELETE FROM nonces WHERE k IN "
            "(SELECT k FROM nonces WHERE expires <= ? ORDER BY expires LIMIT ?)",
            (now, _PURGE_BATCH),
        )
        self._count = max(0, self._count - max(0, cur.rowcount))
        if recount:  # other processes may write the same file
            self._last_count = time.monotonic()
            self._count = int(conn.execute("SELECT COUNT(*) FROM nonces").fetchone()[0])


def _busy(exc: sqlite3.OperationalError) -> bool:
    """SQLITE_BUSY / SQLITE_LOCKED: another process holds the file for longer than the timeout."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "locked" in str(exc)
