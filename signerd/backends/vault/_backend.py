"""Vault / OpenBao transit backend: the ``Backend`` protocol over transit and KV v2.

How transit versions and the metadata record map to version states is
``_states``; reads and writes of both are ``_store``, state changes
``_changes``; requests and their errors are ``_http``; signs take the fast
path in ``_sign`` (from an executor thread) or ``_loopsign`` (from a worker's
loop). Every change of a key is made under its lease (``_lease``).

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
    KeyExists,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ...wire import KeyName
from .. import KeyInfo
from ._auth import Auth
from ._changes import VaultChanges
from ._http import Json, NotFoundInVault, Transport, connection_failed
from ._lease import Held
from ._loopsign import LoopSigner
from ._nodes import Nodes
from ._settings import VaultSettings
from ._sign import SignClient, parse_signature, sign_refusal
from ._states import ForeignKey, Record, malformed

log = logging.getLogger("signerd.vault")


class VaultBackend(VaultChanges):
    """Keys in Vault / OpenBao transit; see the module docstring for the mapping."""

    def __init__(self, settings: VaultSettings, transport: Transport[Auth]) -> None:
        self.settings = settings
        self.transport = transport
        # signs skip hvac: kept-alive connections of their own, hvac's token (``_sign``), and
        # from a worker, the loop's own connections (``_loopsign``)
        self.nodes = transport.nodes or Nodes(settings.nodes)
        self.signer = SignClient(
            settings,
            transport.auth,
            lambda path, body: transport.request("POST", path, body),
            self.nodes,
        )
        self.loop_signer = LoopSigner(self.signer, settings.max_concurrency)
        self.max_concurrency = settings.max_concurrency
        self._init_store()
        self._reported: set[str] = set()  # keys skipped from listings, logged once each

    @property
    def failovers(self) -> int:
        """How many times this backend switched to another node of its cluster."""
        return self.nodes.failovers

    @property
    def node(self) -> str:
        """The address of the node requests go to now."""
        return self.nodes.current

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
            meta = held.record
            if meta.retired or meta.archived or meta.changed or meta.deletion:
                # left over from an earlier key of the same name deleted outside signerd
                self._update_meta(held, lambda m: Record(cas=m.cas))
            info = self._stamped(held, KeyInfo(key, ()))
        log.debug("signerd.vault.create key=%s", key)
        return info

    def rotate(self, key: KeyName, *, pending: bool) -> KeyInfo:
        with self.leases.holding(key, "rotate", exists=lambda: self._exists(key)) as held:
            transit, _, was = self._under(held)
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
            info = replace(self._stamped(held, was), made=new)
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

    def sign(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        if not items:
            return []
        path, body = self._sign_request(key, version, items)
        return self._signatures(key, version, items, self._post_sign(path, body))

    async def sign_on_loop(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError] | None:
        """``sign`` from the running loop (``LoopSigner``), or None: go the blocking way."""
        if not items:
            return []
        path, body = self._sign_request(key, version, items)
        answer = await self.loop_signer.post(path, body)
        return None if answer is None else self._signatures(key, version, items, answer)

    def _sign_request(self, key: KeyName, version: int, items: Sequence[bytes]) -> tuple[str, Json]:
        encoded = [base64.b64encode(item).decode("ascii") for item in items]
        body: Json = {"key_version": version}
        if len(encoded) == 1:
            body["input"] = encoded[0]
        else:
            body["batch_input"] = [{"input": e} for e in encoded]
        return f"{self._mount(key)}/sign/{self._transit_name(key)}", body

    def _signatures(
        self, key: KeyName, version: int, items: Sequence[bytes], answer: Json
    ) -> list[bytes | SignerdError]:
        try:
            data = answer["data"]
            results = data["batch_results"] if len(items) > 1 else [data]
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
        self.loop_signer.close()
        self.signer.close()
        self.transport.close()
        self.nodes.close()
