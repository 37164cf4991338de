"""State changes of a Vault key's versions: ``VaultChanges`` (see ``_states`` for the mapping).

Retire moves ``min_decryption_version`` up when it can, else lists the version
in the metadata record; destroy trims with ``min_available_version``; a
scheduled deletion and each version's last state change are kept in the
record (transit has no place for them). Every change stamps the versions
whose state it changed with the time now (``_stamped``), in a second
check-and-set write after the change itself. Each change is made under the
key's lease (``_lease``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from ...errors import InvalidState, UnknownKey, UnknownVersion
from ...wire import KeyName
from .. import KeyInfo, VersionState
from ._http import NotFoundInVault
from ._lease import Held
from ._states import Record, Transit, key_info
from ._store import VaultStore

log = logging.getLogger("signerd.vault")

_GONE_OR_GOING = (VersionState.RETIRED, VersionState.PENDING_DELETION)


class VaultChanges(VaultStore):
    """set_state, destroy, schedule_deletion and cancel_deletion over transit and the record."""

    def _exists(self, key: KeyName) -> object:
        return self._read_transit(key)

    def _stamped(self, held: Held, before: KeyInfo) -> KeyInfo:
        """The key after a change, each version the change made or moved stamped now."""
        key = held.key
        transit, _, after = self._under(held)
        was = {v.version: v.state for v in before.versions}
        moved = {v.version for v in after.versions if was.get(v.version) is not v.state}
        if not moved:
            return after
        now = int(time.time())

        def stamp(m: Record) -> Record:
            changed = {**m.changed, **dict.fromkeys(moved, now)}
            deletion = {v: at for v, at in m.deletion.items() if v not in moved}
            return replace(m, changed=changed, deletion=deletion)

        return key_info(key, transit, self._update_meta(held, stamp))

    def set_state(self, key: KeyName, version: int, state: VersionState) -> KeyInfo:
        with self.leases.holding(key, "set_state", exists=lambda: self._exists(key)) as held:
            info = self._set_state(held, version, state)
        log.debug("signerd.vault.set_state key=%s version=%s state=%s", key, version, state)
        return info

    def _set_state(self, held: Held, version: int, state: VersionState) -> KeyInfo:
        transit, _, info = self._under(held)
        current = info.version(version)
        if current is None:
            raise UnknownVersion()
        if current.state is state:
            return info
        if state is VersionState.ACTIVE and current.state is VersionState.PENDING:
            self._config(held, min_encryption_version=version)
        elif state is VersionState.RETIRED and current.state in (
            VersionState.PENDING,
            VersionState.VERIFY_ONLY,
        ):
            self._retire(held, transit, version)
        else:
            raise InvalidState(f"cannot set a {current.state} version {state} on this backend")
        return self._stamped(held, info)

    def _retire(self, held: Held, transit: Transit, version: int) -> None:
        if version == transit.min_decryption and version < transit.active:
            self._raise_floor(held, transit, version)
            return
        self._update_meta(held, lambda m: replace(m, retired=m.retired | {version}))

    def _raise_floor(self, held: Held, transit: Transit, version: int) -> int:
        """Retire ``version`` (== min_decryption_version) by raising the floor past it.

        The floor also moves past versions already retired out of order just
        above it. Their public keys go to the metadata record first, since
        transit stops returning keys below the floor.
        """
        floor = version + 1
        while floor in held.record.retired and floor < transit.active:
            floor += 1
        moving = {
            v: transit.keys[v] for v in range(transit.min_decryption, floor) if v in transit.keys
        }

        def archive(m: Record) -> Record:
            return replace(m, archived={**m.archived, **moving})

        self._update_meta(held, archive)
        self._config(held, min_decryption_version=floor)
        return floor

    def schedule_deletion(self, key: KeyName, version: int, at: int) -> KeyInfo:
        """A retired version to pending_deletion, destroyed at ``at`` (kept in the record)."""
        return self._deletion(key, version, VersionState.RETIRED, at)

    def cancel_deletion(self, key: KeyName, version: int) -> KeyInfo:
        """A pending_deletion version back to retired."""
        return self._deletion(key, version, VersionState.PENDING_DELETION, None)

    def _deletion(self, key: KeyName, version: int, was: VersionState, at: int | None) -> KeyInfo:
        with self.leases.holding(key, "deletion", exists=lambda: self._exists(key)) as held:
            return self._deletion_held(held, version, was, at)

    def _deletion_held(
        self, held: Held, version: int, was: VersionState, at: int | None
    ) -> KeyInfo:
        transit, _, info = self._under(held)
        current = info.version(version)
        if current is None:
            raise UnknownVersion()
        if current.state is not was:
            raise InvalidState(f"only a {was} version can be changed so")
        now = int(time.time())

        def change(m: Record) -> Record:
            deletion = {v: t for v, t in m.deletion.items() if v != version}
            if at is not None:
                deletion[version] = at
            return replace(m, changed={**m.changed, version: now}, deletion=deletion)

        return key_info(held.key, transit, self._update_meta(held, change))

    def destroy(self, key: KeyName, version: int) -> KeyInfo:
        with self.leases.holding(key, "destroy", exists=lambda: self._exists(key)) as held:
            info = self._destroy(held, version)
        log.debug("signerd.vault.destroy key=%s version=%s", key, version)
        return info

    def _destroy(self, held: Held, version: int) -> KeyInfo:
        key = held.key
        transit, _, info = self._under(held)
        current = info.version(version)
        if current is None:
            raise UnknownVersion()
        if current.state is VersionState.DESTROYED:
            return info  # destroyed already (another daemon's due destroy)
        if current.state not in _GONE_OR_GOING:
            raise InvalidState("only a retired version can be destroyed")
        oldest = max(transit.min_available, 1)
        if version != oldest:
            raise InvalidState(
                f"Vault transit destroys versions from the oldest up: destroy v{oldest} first"
            )
        if version >= transit.active:
            raise InvalidState("Vault transit cannot destroy a version newer than the active one")
        if version >= transit.min_decryption:  # retired out of order, now at the floor
            self._raise_floor(held, transit, version)
            transit = self._read_transit(key)
        if transit.min_encryption == 0:
            # trim needs an explicit pin; pin the version that is active anyway
            self._config(held, min_encryption_version=transit.latest)
        self.leases.guard(held)
        try:
            self.transport.request(
                "POST", self._key_path(key, "/trim"), {"min_available_version": version + 1}
            )
        except NotFoundInVault as exc:
            raise UnknownKey() from exc
        return self._stamped(held, info)
