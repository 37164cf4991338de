"""The keys' metadata records in KV v2: reads, and writes with check-and-set.

What a record holds is ``_states.Record``. Every write names the KV version it
was read at, so two writers never lose each other's change; the last record
read or written for each key is kept, so a writer that knows the current
version can write without reading first (a stale one just fails its
check-and-set).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from ...errors import BackendError
from ...wire import KeyName
from ._http import Json, NotFoundInVault, Transport
from ._states import Record, malformed, record_of

log = logging.getLogger("signerd.vault")

CAS_ATTEMPTS = 5


class Conflict(Exception):
    """The record changed since it was read (its check-and-set failed)."""


class Records:
    """Reads and check-and-set writes of the records at ``path(key, kind)``."""

    def __init__(self, transport: Transport[Any], path: Callable[[KeyName, str], str]) -> None:
        self._transport = transport
        self._path = path
        self._known: dict[KeyName, Record] = {}
        self._lock = threading.Lock()

    def known(self, key: KeyName) -> Record | None:
        """The last record this process read or wrote for ``key`` (maybe stale)."""
        with self._lock:
            return self._known.get(key)

    def _learn(self, key: KeyName, record: Record) -> Record:
        with self._lock:
            old = self._known.get(key)
            if old is None or old.cas <= record.cas:
                self._known[key] = record
        return record

    def read(self, key: KeyName, *, for_write: bool = False) -> Record:
        """The record (empty when there is none; for a write, at its KV version)."""
        try:
            answer = self._transport.request("GET", self._path(key, "data"))
        except NotFoundInVault:
            return Record(cas=self._version(key) if for_write else 0)
        return self._learn(key, record_of(answer))

    def _version(self, key: KeyName) -> int:
        """The record's KV version for check-and-set when its data cannot be read."""
        try:
            answer = self._transport.request("GET", self._path(key, "metadata"))
            return int(answer["data"]["current_version"])
        except NotFoundInVault:
            return 0
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("metadata record", exc) from exc

    def write(self, key: KeyName, record: Record) -> Record:
        """Write ``record`` over the version it was read at; the record as now stored.

        Raises Conflict when another write came first."""
        body: Json = {"options": {"cas": record.cas}, "data": record.to_json()}
        try:
            answer = self._transport.request("POST", self._path(key, "data"), body)
        except BackendError as exc:
            if "check-and-set" not in str(getattr(exc.__cause__, "errors", "")):
                raise
            log.info("signerd.vault.record_conflict key=%s", key)
            raise Conflict() from exc
        except NotFoundInVault as exc:
            raise BackendError("the Vault metadata mount is missing") from exc
        try:
            version = int(answer["data"]["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("metadata write", exc) from exc
        return self._learn(key, replace(record, cas=version))
