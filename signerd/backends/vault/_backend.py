"""Vault / OpenBao transit backend: the ``Backend`` protocol over transit and KV v2.

How transit versions and the metadata record map to version states is
``_states``; requests and their errors are ``_http``; signs take the fast path
in ``_sign``. Changes of a key are made under its lease (``_lease``), so that
several daemons on one Vault change one key at a time.

The same configuration works against HashiCorp Vault (same transit, KV v2,
token and AppRole API). The token needs: ``<mount>/keys/*`` (create, read,
update), ``<mount>/keys`` (list), ``<mount>/sign/*`` (update),
``<metadata_mount>/data/<mount>/*`` and ``<metadata_mount>/metadata/<mount>/*``
(create, read, update), and the default policy (token lookup-self,
renew-self).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import replace

from ...errors import (
    BackendError,
    BackendSealed,
    BackendUnavailable,
    InvalidState,
    KeyExists,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ...wire import KeyName, valid_part
from .. import KeyInfo, VersionState
from ._auth import Auth
from ._http import Json, NotFoundInVault, Transport, connection_failed
from ._lease import Held, Leases
from ._nodes import Nodes
from ._record import Records
from ._settings import VaultSettings
from ._sign import SignClient, parse_signature, sign_refusal
from ._states import ForeignKey, Record, Transit, key_info, malformed, transit_of

log = logging.getLogger("signerd.vault")


class VaultBackend:
    """Keys in Vault / OpenBao transit; see the module docstring for the mapping."""

    def __init__(self, settings: VaultSettings, transport: Transport[Auth]) -> None:
        self.settings = settings
        self.transport = transport
        # signs skip hvac: kept-alive http.client connections, hvac's token (see _vault_sign)
        self.nodes = transport.nodes or Nodes(settings.nodes)
        self.signer = SignClient(
            settings,
            transport.auth,
            lambda path, body: transport.request("POST", path, body),
            self.nodes,
        )
        self.max_concurrency = settings.max_concurrency
        self.records = Records(transport, self._meta_path)
        # a holder's transit call (one retry at most) lands within 2 timeouts of its guard
        self.leases = Leases(
            self.records,
            ttl=4 * settings.timeout,
            wait=settings.timeout,
            margin=2 * settings.timeout,
        )
        self._reported: set[str] = set()  # keys skipped from listings, logged once each

    @property
    def failovers(self) -> int:
        """How many times this backend switched to another node of its cluster."""
        return self.nodes.failovers

    @property
    def node(self) -> str:
        """The address of the node requests go to now."""
        return self.nodes.current

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

    def _read(self, key: KeyName) -> tuple[Transit, Record, KeyInfo]:
        transit = self._read_transit(key)
        meta = self.records.read(key)
        return transit, meta, key_info(key, transit, meta)

    def _under(self, held: Held) -> tuple[Transit, Record, KeyInfo]:
        """The key read under its lease (the record is the one the lease was written in)."""
        transit = self._read_transit(held.key)
        return transit, held.record, key_info(held.key, transit, held.record)

    # --- writing ---

    def _config(self, held: Held, **values: int) -> None:
        self.leases.guard(held)
        try:
            self.transport.request("POST", self._key_path(held.key, "/config"), dict(values))
        except NotFoundInVault as exc:
            raise UnknownKey() from exc

    # --- Backend protocol ---

    def list_keys(self) -> list[KeyInfo]:
        found: list[KeyName] = []
        mounts = {self.settings.mount, *self.settings.tenant_mounts.values()}
        for mount in sorted(mounts):
            try:
                answer = self.transport.request("LIST", f"{mount}/keys")
                names = answer["data"]["keys"]
            except NotFoundInVault:
                continue
            except (KeyError, TypeError) as exc:
                raise malformed("key list", exc) from exc
            for transit_name in names:
                key = self._parse_name(str(transit_name))
                if key is not None and self._mount(key) == mount:
                    found.append(key)
        infos = []
        for key in sorted(found):
            try:
                infos.append(self.describe(key))
            except (UnknownKey, ForeignKey):
                continue  # deleted since the listing, or not a signing key of ours
            except BackendError:
                # One unreadable key never fails the whole listing (the key service
                # keeps a known key that a listing lacks until it is proven gone).
                if str(key) not in self._reported:
                    self._reported.add(str(key))
                    log.warning("signerd.vault.skip_unreadable key=%s", key)
                continue
        return infos

    def describe(self, key: KeyName) -> KeyInfo:
        return self._read(key)[2]

    def create(self, key: KeyName) -> KeyInfo:
        with self.leases.holding(key, "create") as held:
            try:
                self._read_transit(key)
            except UnknownKey:
                pass
            else:
                raise KeyExists()
            body = {"type": "ed25519", "exportable": False, "allow_plaintext_backup": False}
            self.leases.guard(held)
            # transit answers a create of an existing key with success, so a retry is safe
            self.transport.request("POST", self._key_path(key), body)
            if held.record.retired or held.record.archived:
                # left over from an earlier key of the same name deleted outside signerd
                self.leases.update(held, lambda m: Record(cas=m.cas))
            info = self._under(held)[2]
        log.debug("signerd.vault.create key=%s", key)
        return info

    def rotate(self, key: KeyName, *, pending: bool) -> KeyInfo:
        with self.leases.holding(key, "rotate", exists=lambda: self._read_transit(key)) as held:
            transit = self._read_transit(key)
            before = transit.latest
            if pending:
                if transit.min_encryption == 0:
                    # pin the active version first, so the new one arrives as pending
                    self._config(held, min_encryption_version=before)
                new = self._rotate_once(held, before)
            elif transit.min_encryption == 0:
                new = self._rotate_once(held, before)  # latest becomes active: one step
            elif transit.min_encryption == before and transit.min_available == 0:
                # unpin (no visible change, the pinned version is the latest), then rotate
                self._config(held, min_encryption_version=0)
                new = self._rotate_once(held, before)
            else:
                # transit needs a pin here (trimmed key, or pending versions exist):
                # the new version is pending until the pin moves to it
                new = self._rotate_once(held, before)
                self._config(held, min_encryption_version=new)
            info = replace(self._under(held)[2], made=new)
        log.debug("signerd.vault.rotate key=%s latest=%s pending=%s", key, info.latest, pending)
        return info

    def _rotate_once(self, held: Held, before: int) -> int:
        """Rotate under the lease: the new version is ``before + 1``, confirmed; after
        a lost answer, look before trying again (never two versions)."""
        key, made = held.key, before + 1
        path = self._key_path(key, "/rotate")
        for attempt in (1, 2):
            self.leases.guard(held)
            try:
                answer = self.transport.request("POST", path, {}, retry=False)
            except NotFoundInVault as exc:
                raise UnknownKey() from exc
            except BackendSealed:
                raise  # sealed: Vault did nothing
            except BackendUnavailable as exc:
                latest = self._read_transit(key).latest
                if latest > before:
                    log.info("signerd.vault.rotate_answer_lost key=%s done=yes", key)
                    return self._confirm(key, made, latest)
                if attempt == 2 or not connection_failed(exc.__cause__):
                    raise
                log.info("signerd.vault.rotate_answer_lost key=%s done=no retry=yes", key)
                continue
            data = answer.get("data") or {}
            if data.get("latest_version") == made:
                return made
            return self._confirm(key, made, self._read_transit(key).latest)
        raise AssertionError("unreachable")

    def _confirm(self, key: KeyName, made: int, latest: int) -> int:
        """The version a rotate under the lease made: ``made``, unless something that
        does not take the lease rotated the key too (then which one is ours is unknown)."""
        if latest == made:
            return made
        log.error("signerd.vault.rotated_elsewhere key=%s made=%s latest=%s", key, made, latest)
        raise BackendError("the key was rotated by another writer at the same time")

    def set_state(self, key: KeyName, version: int, state: VersionState) -> KeyInfo:
        with self.leases.holding(key, "set_state", exists=lambda: self._read_transit(key)) as held:
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
            info = self._under(held)[2]
        log.debug("signerd.vault.set_state key=%s version=%s state=%s", key, version, state)
        return info

    def _retire(self, held: Held, transit: Transit, version: int) -> None:
        if version == transit.min_decryption and version < transit.active:
            self._raise_floor(held, transit, version)
            return
        self.leases.update(held, lambda m: replace(m, retired=m.retired | {version}))

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

        self.leases.update(held, archive)
        self._config(held, min_decryption_version=floor)
        return floor

    def destroy(self, key: KeyName, version: int) -> KeyInfo:
        with self.leases.holding(key, "destroy", exists=lambda: self._read_transit(key)) as held:
            transit, _, info = self._under(held)
            current = info.version(version)
            if current is None:
                raise UnknownVersion()
            if current.state is VersionState.DESTROYED:
                return info
            if current.state is not VersionState.RETIRED:
                raise InvalidState("only a retired version can be destroyed")
            oldest = max(transit.min_available, 1)
            if version != oldest:
                raise InvalidState(
                    f"Vault transit destroys versions from the oldest up: destroy v{oldest} first"
                )
            if version >= transit.active:
                raise InvalidState(
                    "Vault transit cannot destroy a version newer than the active one"
                )
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
            info = self._under(held)[2]
        log.debug("signerd.vault.destroy key=%s version=%s", key, version)
        return info

    def sign(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        if not items:
            return []
        encoded = [base64.b64encode(item).decode("ascii") for item in items]
        body: Json = {"key_version": version}
        if len(encoded) == 1:
            body["input"] = encoded[0]
        else:
            body["batch_input"] = [{"input": e} for e in encoded]
        path = f"{self._mount(key)}/sign/{self._transit_name(key)}"
        answer = self._post_sign(path, body)
        try:
            data = answer["data"]
            results = data["batch_results"] if len(encoded) > 1 else [data]
            if len(results) != len(items):
                raise ValueError(f"{len(results)} results for {len(items)} items")
        except (KeyError, TypeError, ValueError) as exc:
            raise malformed("sign answer", exc) from exc
        causes: list[str] = []
        signed = [parse_signature(result, version, causes) for result in results]
        if causes:
            log.warning(
                "signerd.vault.sign_refused key=%s version=%s failed=%s of=%s cause=%s",
                *(key, version, len(causes), len(items), causes[0]),
            )
        return signed

    def _post_sign(self, path: str, body: Json) -> Json:
        """POST a sign (safe to repeat). A node that does not know the key or version
        may be a standby lagging a rotate: when it is not the active node any more,
        the sign is sent once more, to the active one."""
        for attempt in (1, 2):
            seen = self.nodes.generation
            try:
                return self.signer.post(path, body)
            except NotFoundInVault as exc:
                err: SignerdError = UnknownKey()
                cause: BaseException | None = exc
            except BackendError as exc:
                err, cause = sign_refusal(exc), exc.__cause__
            if (
                attempt == 1
                and isinstance(err, UnknownKey | UnknownVersion)
                and self.nodes.clustered
            ):
                self.nodes.ensure_active()
                if self.nodes.generation != seen:
                    log.info("signerd.vault.sign_on_active_node cause=%s", err.code)
                    continue
            raise err from cause
        raise AssertionError("unreachable")

    def check(self) -> None:
        self.nodes.ensure_active()
        try:
            self.transport.request("GET", "auth/token/lookup-self")
        except NotFoundInVault as exc:
            raise BackendUnavailable("Vault cannot look up signerd's token") from exc
        except BackendError as exc:
            raise BackendUnavailable("Vault is not usable") from exc

    def close(self) -> None:
        self.signer.close()
        self.transport.close()
        self.nodes.close()
