"""The paths, reads and writes under every Vault backend call: ``VaultStore``.

A key's transit key, its metadata record in KV v2 (written with
check-and-set), and the ``KeyInfo`` both make (``_states``). The state
changes are ``_changes``; the rest of the ``Backend`` protocol ``_backend``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from ...errors import BackendError, UnknownKey
from ...wire import KeyName, valid_part
from .. import KeyInfo
from ._auth import Auth
from ._http import NotFoundInVault, Transport
from ._settings import VaultSettings
from ._states import Record, Transit, key_info, malformed, record_of, transit_of

log = logging.getLogger("signerd.vault")

_CAS_ATTEMPTS = 5


class VaultStore:
    """Reading and writing one Vault's transit keys and metadata records."""

    settings: VaultSettings
    transport: Transport[Auth]

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

    def _read_meta(self, key: KeyName, *, for_write: bool = False) -> Record:
        try:
            answer = self.transport.request("GET", self._meta_path(key))
        except NotFoundInVault:
            return Record(cas=self._meta_version(key) if for_write else 0)
        return record_of(answer)

    def _meta_version(self, key: KeyName) -> int:
        """The record's KV version for check-and-set when its data cannot be read."""
        try:
            answer = self.transport.request("GET", self._meta_path(key, "metadata"))
            return int(answer["data"]["current_version"])
        except NotFoundInVault:
            return 0
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("metadata record", exc) from exc

    def _read(self, key: KeyName) -> tuple[Transit, Record, KeyInfo]:
        transit = self._read_transit(key)
        meta = self._read_meta(key)
        return transit, meta, key_info(key, transit, meta)

    # --- writing ---

    def _config(self, key: KeyName, **values: int) -> None:
        try:
            self.transport.request("POST", self._key_path(key, "/config"), dict(values))
        except NotFoundInVault as exc:
            raise UnknownKey() from exc

    def _update_meta(self, key: KeyName, change: Callable[[Record], Record]) -> Record:
        """Read-modify-write the metadata record with check-and-set; the record written."""
        for _ in range(_CAS_ATTEMPTS):
            meta = self._read_meta(key, for_write=True)
            written = replace(change(meta), cas=meta.cas + 1)
            body = {"options": {"cas": meta.cas}, "data": written.to_json()}
            try:
                self.transport.request("POST", self._meta_path(key), body)
                return written
            except BackendError as exc:
                if "check-and-set" not in str(getattr(exc.__cause__, "errors", "")):
                    raise
                log.info("signerd.vault.record_conflict key=%s", key)
            except NotFoundInVault as exc:
                raise BackendError("the Vault metadata mount is missing") from exc
        raise BackendError("the key's metadata record keeps changing")

    def describe(self, key: KeyName) -> KeyInfo:
        return self._read(key)[2]
