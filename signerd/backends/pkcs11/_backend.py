"""PKCS#11 backend: Ed25519 keys generated and kept on a token (SoftHSM2 in tests).

What signerd keeps on the token is ``_objects``; the session (login, the one
lock per library, error translation, starting again) is ``_session``. This
module is the ``Backend`` protocol on top of them: reading the keyring,
generating versions, writing states, signing, and proving keys gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from ...errors import (
    BackendError,
    BackendUnavailable,
    InvalidState,
    KeyExists,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ...wire import KeyName, parse_kid
from .. import KeyInfo, KeyVersion, VersionState
from ._blind import absent_keys, blind_check, version_gone
from ._generate import generate_pair, key_attributes
from ._ladder import Ladder, TokenVanished
from ._leftovers import remove_private, sweep
from ._objects import (
    APPLICATION,
    KeyMeta,
    key_of_label,
    label_digest,
    meta_label,
    raw_public_key,
    resources_available,
)
from ._revalidate import unchanged
from ._session import TokenSession
from ._settings import TokenConfig, object_uri, parse_settings

log = logging.getLogger("signerd.pkcs11")

_T = TypeVar("_T")

_SHOW_PAUSES = (0.005, 0.02, None)  # between searches for a named object (None: give up)


class Pkcs11Backend:
    """Keys on one PKCS#11 token. Thread-safe: every token call holds the module lock."""

    max_concurrency = 1

    def __init__(
        self,
        config: TokenConfig,
        *,
        open_lib: Callable[[str], Any] | None = None,
        ladder: Ladder | None = None,
    ) -> None:
        self._config = config
        self._token = TokenSession(config, open_lib=open_lib or pkcs11.lib, ladder=ladder)
        self._lock = self._token.lock
        self._private = self._token.private_keys  # kid -> private key object (this session's)
        self._public: dict[str, bytes] = {}  # kid -> raw public key (never changes)
        self._reported: set[str] = set()  # malformed objects already logged (by digest)
        # keys this process has seen on the token (the last listing's count, at least 1 once
        # any key was read or made): a token that then shows none is blind, not empty
        self._listed = 0
        self._swept = False  # destroyed versions' leftover private keys removed (once)

    def object_uri(self, kid: str) -> str:
        """The RFC 7512 URI of a version's private key (CKA_LABEL = CKA_ID = the kid)."""
        return object_uri(self._config, kid)

    def try_enter(self) -> bool:
        return self._lock.acquire(blocking=False)

    def leave(self) -> None:
        self._lock.release()

    def _report(self, label: object, reason: str) -> None:
        """Log a malformed object once per process (by a digest of its label, never the label)."""
        digest = label_digest(label)
        if f"{digest}:{reason}" not in self._reported:
            self._reported.add(f"{digest}:{reason}")
            log.warning("signerd.pkcs11.skip_malformed label_sha256=%s reason=%s", digest, reason)

    # --- reading --------------------------------------------------------

    def _meta_objects(
        self, session: Any, key: KeyName | None
    ) -> Iterator[tuple[KeyName, int, Any, KeyMeta]]:
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
        }
        if key is not None:
            template[Attribute.LABEL] = meta_label(key)
        for obj in session.get_objects(template):
            label = obj[Attribute.LABEL]
            name = key_of_label(label) if isinstance(label, str) else None
            if name is None:
                if isinstance(label, str) and label.startswith("signerd/"):
                    self._report(label, "invalid_name")
                continue
            try:
                meta = KeyMeta.decode(obj[Attribute.VALUE])
            except (ValueError, KeyError, TypeError, AttributeError):
                self._report(label, "unreadable_metadata")
                continue
            yield name, meta.seq, obj, meta

    def _current_meta(self, session: Any, key: KeyName) -> tuple[KeyMeta, list[Any]]:
        found = sorted(self._meta_objects(session, key), key=lambda t: t[1])
        if not found:
            blind_check(session, key, listed=self._listed)
            raise UnknownKey()
        self._listed = max(self._listed, 1)
        return found[-1][3], [obj for _, _, obj, _ in found]

    def _public_key(self, session: Any, kid: str) -> bytes:
        raw = self._public.get(kid)
        if raw is None:
            for pause in _SHOW_PAUSES:
                try:
                    obj = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=kid)
                    break
                except p11e.NoSuchKey as exc:
                    # SoftHSM can miss an object while another process writes the token
                    if pause is None:
                        raise TokenVanished("a version's public key does not show") from exc
                    time.sleep(pause)
            raw = raw_public_key(obj[Attribute.EC_POINT])
            self._public[kid] = raw
        return raw

    def _meta_for_change(self, session: Any, key: KeyName) -> tuple[KeyMeta, list[Any]]:
        """The key's metadata before a change, with every version's public key read first:
        what fails to read fails before anything is written, so the call can be tried again."""
        meta, old = self._current_meta(session, key)
        for version in meta.versions:
            self._public_key(session, key.kid(version))
        return meta, old

    def _prefetch_public(self, session: Any, kids: set[str]) -> None:
        """Read many public keys in one pass over the token (one search, not one per kid)."""
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
            label = obj[Attribute.LABEL]
            if label in kids:
                self._public[label] = raw_public_key(obj[Attribute.EC_POINT])

    def _info(self, session: Any, key: KeyName, meta: KeyMeta) -> KeyInfo:
        self._public.update(meta.public_keys(key))  # those the metadata keeps need no search
        versions = tuple(
            KeyVersion(
                version=v,
                kid=key.kid(v),
                state=state,
                public_key=self._public_key(session, key.kid(v)),
                created_at=created,
                state_changed_at=meta.changed.get(v),
                deletion_at=meta.deletion.get(v),
            )
            for v, (state, created) in sorted(meta.versions.items())
        )
        return KeyInfo(key=key, versions=versions)

    def list_keys(self) -> list[KeyInfo]:
        def run(session: Any) -> list[KeyInfo]:
            latest: dict[KeyName, KeyMeta] = {}
            handles = self._token.meta_handles
            handles.clear()
            for name, seq, obj, meta in self._meta_objects(session, None):
                if name not in latest or latest[name].seq < seq:
                    latest[name], handles[name] = meta, obj
            if latest and not self._swept:  # a destroy cut short by a crash left its key
                sweep(session, latest)
                self._swept = True
            wanted = {k.kid(v) for k, m in latest.items() for v in m.versions if v not in m.public}
            wanted -= set(self._public)
            if wanted:
                self._prefetch_public(session, wanted)
            infos = []
            for k, m in sorted(latest.items()):
                try:
                    infos.append(self._info(session, k, m))
                except (BackendUnavailable, BackendError, TokenVanished):
                    # A version without a readable public key: skip the key, never the answer.
                    self._report(meta_label(k), "unreadable_public_key")
            if infos:  # an empty listing may be a token that cannot open its files
                self._listed = len(infos)
            return infos

        return self._token.call(run)

    def open(self) -> None:
        self._token.call(lambda session: None)  # ``Opening``: the library, a logged-in session

    def unchanged(self) -> bool:
        return unchanged(self._token)  # ``Revalidating``: no search

    def describe(self, key: KeyName) -> KeyInfo:
        return self._token.call(lambda s: self._info(s, key, self._current_meta(s, key)[0]))

    # --- writing --------------------------------------------------------

    def _write_meta(self, session: Any, key: KeyName, meta: KeyMeta, old: Sequence[Any]) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
                Attribute.APPLICATION: APPLICATION,
                Attribute.LABEL: meta_label(key),
                Attribute.VALUE: meta.with_public(key, self._public).encode(),
            }
        )
        for obj in old:
            obj.destroy()

    def _generate(self, session: Any, key: KeyName, version: int) -> int:
        """Generate the key pair for version (or the next free one); return its number."""
        made, public = generate_pair(session, key, version)
        self._public[key.kid(made)] = public
        return made

    def create(self, key: KeyName) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            if any(True for _ in self._meta_objects(session, key)):
                raise KeyExists()
            blind_check(session, key, listed=self._listed)  # never a second v1 on a blind token
            version = self._generate(session, key, 1)
            now = int(time.time())
            meta = KeyMeta(1, {version: (VersionState.ACTIVE, now)}, {version: now})
            self._write_meta(session, key, meta, [])
            self._listed = max(self._listed, 1)
            return self._info(session, key, meta)

        return self._token.call(run)

    def rotate(self, key: KeyName, *, pending: bool) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._meta_for_change(session, key)
            version = self._generate(session, key, max(meta.versions, default=0) + 1)
            changes: dict[int, VersionState] = {}
            if pending:
                changes[version] = VersionState.PENDING
            else:
                changes = meta.promotion(version)
            new = meta.with_states(changes, created_at=int(time.time()))
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._token.call(run)

    def set_state(self, key: KeyName, version: int, state: VersionState) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._meta_for_change(session, key)
            if version not in meta.versions:
                raise UnknownVersion()
            changes = meta.promotion(version) if state is VersionState.ACTIVE else {version: state}
            new = meta.with_states(changes)
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._token.call(run)

    def schedule_deletion(self, key: KeyName, version: int, at: int) -> KeyInfo:
        return self._deletion(key, version, VersionState.RETIRED, VersionState.PENDING_DELETION, at)

    def cancel_deletion(self, key: KeyName, version: int) -> KeyInfo:
        return self._deletion(key, version, VersionState.PENDING_DELETION, VersionState.RETIRED)

    def _deletion(
        self, key: KeyName, version: int, was: VersionState, to: VersionState, at: int | None = None
    ) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._meta_for_change(session, key)
            if version not in meta.versions:
                raise UnknownVersion()
            if meta.versions[version][0] is not was:
                raise InvalidState(f"only a {was} version can be made {to}")
            new = meta.with_states({version: to}, deletion_at=at)
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._token.call(run)

    def destroy(self, key: KeyName, version: int) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._meta_for_change(session, key)
            if version not in meta.versions:
                raise UnknownVersion()
            if meta.versions[version][0] is VersionState.DESTROYED:
                return self._info(session, key, meta)  # destroyed already (another daemon)
            new = meta.with_states({version: VersionState.DESTROYED})
            self._write_meta(session, key, new, old)  # the change; a crash next: ``sweep``
            self._private.pop(key.kid(version), None)
            remove_private(session, key.kid(version))
            return self._info(session, key, new)

        return self._token.call(run)

    # --- signing --------------------------------------------------------

    def sign(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        kid = key.kid(version)

        def run(session: Any) -> list[bytes | SignerdError]:
            priv = self._private.get(kid)
            if priv is None:
                try:
                    priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=kid)
                except p11e.NoSuchKey as exc:
                    version_gone(self._current_meta(session, key)[0], version)
                    raise TokenVanished("a version's private key does not show") from exc
                self._private[kid] = priv
            return [priv.sign(data, mechanism=Mechanism.EDDSA) for data in items]

        return self._token.call(run)

    def check(self) -> None:
        def run(session: Any) -> None:
            # A cheap round trip that needs a live, logged-in session; a token that
            # listed keys before and now shows none cannot open its files.
            for _ in session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: APPLICATION}
            ):
                return
            if self._listed:  # climb the ladder: a new session sees a token that came back
                raise TokenVanished("the token shows none of its keys")

        resources_available()
        if not unchanged(self._token):  # what was listed reads back: no search needed
            self._token.call(run)

    # --- recovery ---------------------------------------------------------

    def recover(self) -> None:
        """Start again from nothing: close the session, re-initialise the library, log in."""
        self._token.restart()

    def confirm_absent(
        self, missing: Sequence[KeyInfo], present: Sequence[KeyName]
    ) -> frozenset[KeyName]:
        """Of keys missing from a listing, those the token positively says are gone.

        Proof needs a token that reads well now: files can be opened, a key
        that is still listed reads back (its metadata and public key), and
        nothing labelled with the missing key's name or any of its kids is
        left. SoftHSM answers searches with nothing when it cannot open its
        files, so an empty or shrunken listing alone proves nothing.
        """
        resources_available()
        if not present:
            return frozenset()

        def run(session: Any) -> frozenset[KeyName]:
            return absent_keys(
                session, self._current_meta(session, present[0])[0], present[0], missing
            )

        try:
            return self._token.call(run)
        except UnknownKey as exc:
            raise BackendUnavailable("a listed key cannot be read back") from exc

    def close(self) -> None:
        self._token.close()

    # --- for maintenance, tests and audits ----------------------------------

    def on_token(self, fn: Callable[[Any], _T]) -> _T:
        """Run fn(session) on the token, with this backend's lock, login and error translation."""
        return self._token.call(fn)

    def private_key_attributes(self, kid: str) -> dict[str, Any]:
        """The security attributes of a version's private key, read back from the token."""
        parse_kid(kid)
        return self._token.call(lambda session: key_attributes(session, kid))


def build(settings: TokenConfig) -> Pkcs11Backend:
    """The backend for a parsed table (nothing is opened until the first call)."""
    return Pkcs11Backend(settings)


def from_config(cfg: Mapping[str, Any]) -> Pkcs11Backend:
    """The backend for a configuration table (keys: see ``parse_settings``)."""
    return build(parse_settings(cfg))
