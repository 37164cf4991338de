"""The paths, reads and writes under every Vault backend call: ``VaultStore``.

A key's transit key, its metadata record in KV v2 (written with
check-and-set, ``_record``), and the ``KeyInfo`` both make (``_states``).
Every change of a key is made under its lease (``_lease``), so that several
daemons on one Vault change one key at a time. The state changes are
``_changes``; the rest of the ``Backend`` protocol ``_backend``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...errors import UnknownKey
from ...wire import KeyName, valid_part
from .. import KeyInfo
from ._auth import Auth
from ._http import NotFoundInVault, Transport
from ._lease import Held, Leases
from ._record import Records
from ._settings import VaultSettings
from ._states import Record, Transit, key_info, transit_of

log = logging.getLogger("signerd.vault")


class VaultStore:
    """Reading and writing one Vault's transit keys and metadata records."""

    settings: VaultSettings
    transport: Transport[Auth]
    records: Records
    leases: Leases

    def _init_store(self) -> None:
        self.records = Records(self.transport, self._meta_path)
        # a holder's transit call (one retry at most) lands within 2 timeouts of its guard
        timeout = self.settings.timeout
        self.leases = Leases(self.records, ttl=4 * timeout, wait=timeout, margin=2 * timeout)

    # --- names and paths ---

    def _mount(self, key: KeyName) -> str:
        return self.settings.tenant_mounts.get(key.tenant, self.settings.mount)

    def _transit_name(self, key: KeyName) -> str:
        return f"{self.settings.key_prefix}{key.tenant}.{key.name}"

    def _key_path(self, key: KeyName, suffix: str = "") -> str:
        return f"{self._mount(key)}/keys/{self._transit_name(key)}{suffix}"

    def _meta_path(self, key: KeyName, kind: str = "data") -> str:
        m = self.settings.metadata_mount
        return f"{m}/{kind}/{self._mount(key)}/{self._transit_name(key)}"

    def _parse_name(self, transit_name: str) -> KeyName | None:
        prefix = self.settings.key_prefix
        if not transit_name.startswith(prefix):
            return None
        tenant, dot, name = transit_name[len(prefix) :].partition(".")
        if not dot or not all(valid_part(p) and p.isprintable() for p in (tenant, name)):
            return None
        return KeyName(tenant, name)

    # --- reading ---

    def _read_transit(self, key: KeyName) -> Transit:
        try:
            answer = self.transport.request("GET", self._key_path(key))
        except NotFoundInVault as exc:
            raise UnknownKey() from exc
        return transit_of(key, answer)

    def _read_meta(self, key: KeyName) -> Record:
        return self.records.read(key)

    def _read(self, key: KeyName) -> tuple[Transit, Record, KeyInfo]:
        transit = self._read_transit(key)
        meta = self._read_meta(key)
        return transit, meta, key_info(key, transit, meta)

    def _under(self, held: Held) -> tuple[Transit, Record, KeyInfo]:
        """The key read under its lease (the record is the one this holder last wrote)."""
        transit = self._read_transit(held.key)
        return transit, held.record, key_info(held.key, transit, held.record)

    # --- writing (under the key's lease) ---

    def _config(self, held: Held, **values: int) -> None:
        self.leases.guard(held)
        try:
            self.transport.request("POST", self._key_path(held.key, "/config"), dict(values))
        except NotFoundInVault as exc:
            raise UnknownKey() from exc

    def _update_meta(self, held: Held, change: Callable[[Record], Record]) -> Record:
        """Change the metadata record with check-and-set under the lease; the record written."""
        return self.leases.update(held, change)

    def describe(self, key: KeyName) -> KeyInfo:
        return self._read(key)[2]
