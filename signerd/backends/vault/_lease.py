"""The lease on a key's changes, kept in its metadata record, so that several daemons
on one Vault change a key one at a time.

Transit has no check-and-set: two rotates at once both succeed, and each answer
is read after both landed, so neither can tell which version it made. Every
change of a key (create, rotate, state change, destroy) therefore first writes a
lease into the key's metadata record with check-and-set: exactly one writer gets
it, naming its process and a nonce of its own. It then reads the key, makes its
transit calls, and writes the record again without the lease. Under the lease,
the version a rotate made is the one after the latest it read.

A holder that dies leaves its lease behind. Another process takes it over once
it has seen the same lease for the lease's time to live (its own monotonic
clock, so clocks on different hosts need not agree), or at once when the lease's
expiry, by the holder's wall clock, is a whole time to live in the past. A
holder makes a transit call only while enough of its time is left for the call
to land before anyone may take over; record writes are check-and-set, so a
holder whose lease was taken over cannot overwrite the record.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

from ...errors import BackendUnavailable, SignerdError
from ...wire import KeyName
from ._record import CAS_ATTEMPTS, Conflict, Records
from ._states import Lease, Record

log = logging.getLogger("signerd.vault")

FIRST_DELAY = 0.005  # seconds between looks at a lease held by another, doubling
MAX_DELAY = 0.1


@dataclass
class Held:
    """A lease this process holds, and the key's record as it last wrote it."""

    key: KeyName
    lease: Lease
    since: float  # monotonic time just before the lease was written
    record: Record


def holder_name() -> str:
    """This process as named in its leases: host and pid."""
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:80] or "host"
    return f"{host}:{os.getpid()}"


class Leases:
    """Takes and gives back the leases of keys' changes.

    ``ttl`` is how long a lease lasts, ``wait`` how long a change waits for a
    lease held by another before it is refused as unavailable, ``margin`` the
    time a holder keeps in hand for its last transit call to land.
    """

    def __init__(self, records: Records, *, ttl: float, wait: float, margin: float) -> None:
        self.records = records
        self.ttl, self.wait, self.margin = ttl, wait, margin
        self._seen: dict[KeyName, tuple[str, float]] = {}  # key -> (nonce, first seen)
        self._lock = threading.Lock()

    @contextmanager
    def holding(
        self, key: KeyName, op: str, *, exists: Callable[[], object] | None = None
    ) -> Iterator[Held]:
        """Hold the lease of ``key`` for ``op``; ``exists`` is called (and may raise)
        before a record is first written for a key that has none."""
        held = self.acquire(key, op, exists=exists)
        try:
            yield held
        finally:
            self.release(held)

    def acquire(self, key: KeyName, op: str, *, exists: Callable[[], object] | None = None) -> Held:
        mine = Lease(holder_name(), secrets.token_hex(16), op, int(self.ttl * 1000), 0)
        deadline = time.monotonic() + self.wait
        delay = FIRST_DELAY
        since: float | None = None
        record = self.records.known(key)  # a stale one only fails its check-and-set
        while True:
            if record is None or record.lease is not None:
                record = self.records.read(key, for_write=True)
                if record.cas == 0 and exists is not None:
                    exists()
                    exists = None
            lease = record.lease
            if lease is not None and lease.nonce == mine.nonce:
                return self._got(key, lease, since or time.monotonic(), record)
            if lease is None or self._stale(key, lease):
                if lease is not None:
                    log.warning(
                        "signerd.vault.lease_taken_over key=%s holder=%s op=%s",
                        *(key, lease.holder, lease.op),
                    )
                if since is None:
                    since = time.monotonic()
                mine = replace(mine, expires=int(time.time() * 1000) + mine.ttl_ms)
                try:
                    written = self.records.write(key, replace(record, lease=mine))
                except Conflict:
                    record = None
                    continue
                except SignerdError:
                    self._abandon(key, mine)
                    raise
                return self._got(key, mine, since, written)
            if time.monotonic() >= deadline:
                log.warning(
                    "signerd.vault.lease_busy key=%s holder=%s op=%s", key, lease.holder, lease.op
                )
                raise BackendUnavailable("the key is being changed through another process")
            time.sleep(delay * (0.5 + random.random()))
            delay = min(2 * delay, MAX_DELAY)
            record = None

    def _got(self, key: KeyName, lease: Lease, since: float, record: Record) -> Held:
        with self._lock:
            self._seen.pop(key, None)
        return Held(key, lease, since, record)

    def _stale(self, key: KeyName, lease: Lease) -> bool:
        """Another's lease: seen unchanged for its time to live, or long expired."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or seen[0] != lease.nonce:
                seen = self._seen[key] = (lease.nonce, now)
        if now - seen[1] >= lease.ttl_ms / 1000:
            return True
        return time.time() * 1000 > lease.expires + lease.ttl_ms

    def _abandon(self, key: KeyName, lease: Lease) -> None:
        """A lease write whose answer was lost: give the lease back if it landed."""
        try:
            record = self.records.read(key, for_write=True)
            if record.lease is not None and record.lease.nonce == lease.nonce:
                self.records.write(key, replace(record, lease=None))
        except (SignerdError, Conflict):
            log.warning("signerd.vault.lease_not_released key=%s op=%s", key, lease.op)

    def guard(self, held: Held) -> None:
        """Before a transit call: refuse it unless it lands well within the lease."""
        if time.monotonic() - held.since > self.ttl - self.margin:
            log.warning("signerd.vault.lease_too_short key=%s op=%s", held.key, held.lease.op)
            raise BackendUnavailable("the key's change took too long to finish safely")

    def update(self, held: Held, change: Callable[[Record], Record]) -> Record:
        """Change the record under the lease; fails if another took the lease over."""
        record = held.record
        for _ in range(CAS_ATTEMPTS):
            try:
                new = replace(change(record), lease=held.lease, cas=record.cas)
                held.record = self.records.write(held.key, new)
                return held.record
            except Conflict:
                record = self.records.read(held.key, for_write=True)
                if record.lease is None or record.lease.nonce != held.lease.nonce:
                    log.warning("signerd.vault.lease_lost key=%s op=%s", held.key, held.lease.op)
                    raise BackendUnavailable("another process took over the key's change") from None
        raise BackendUnavailable("the key's metadata record keeps changing")

    def release(self, held: Held) -> None:
        """Write the record without the lease (a failure is logged: the lease expires)."""
        record = held.record
        for _ in range(CAS_ATTEMPTS):
            try:
                held.record = self.records.write(held.key, replace(record, lease=None))
                return
            except Conflict:
                try:
                    record = self.records.read(held.key, for_write=True)
                except SignerdError:
                    break
                if record.lease is None or record.lease.nonce != held.lease.nonce:
                    log.warning("signerd.vault.lease_lost key=%s op=%s", held.key, held.lease.op)
                    return
            except SignerdError:
                break
        log.warning("signerd.vault.lease_not_released key=%s op=%s", held.key, held.lease.op)
