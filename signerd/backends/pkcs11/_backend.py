"""PKCS#11 backend: Ed25519 keys generated and kept on a token (SoftHSM2 in tests).

What lives on the token, so that every daemon pointed at it sees one keyring:

* per version, a key pair generated on the token (``CKK_EC_EDWARDS``), both
  halves labelled with the kid (``CKA_LABEL`` = ``CKA_ID`` = kid); the private
  half is ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE``, not
  ``CKA_EXTRACTABLE``;
* per key, a private ``CKO_DATA`` object (application ``signerd``, label
  ``signerd/TENANT/NAME``) whose value is the key's state as JSON with a
  sequence number. Data values are read-only once created, so a state change
  writes a new object with the next sequence and then removes the old ones;
  a reader takes the highest sequence, so each change is one atomic step.

Token access is serialised by one lock per PKCS#11 module: python-pkcs11 calls
``C_Initialize(NULL)``, after which SoftHSM takes no locks of its own, and two
threads inside the library at once crash the process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_named_curve_parameters

from ...errors import (
    BackendError,
    BackendUnavailable,
    KeyExists,
    SignerdError,
    UnknownKey,
    UnknownVersion,
)
from ...wire._names import KeyName, parse_kid, valid_part
from .. import KeyInfo, KeyVersion, VersionState

log = logging.getLogger("signerd.pkcs11")

APPLICATION = "signerd"
ED25519_OID = "1.3.101.112"
_META_FORMAT = 1
_T = TypeVar("_T")

# Errors after which the session (or the whole library) must be set up again:
# lost sessions and tokens, and resource errors (device, memory, general failures).
_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.DeviceMemory,
    p11e.HostMemory,
    p11e.FunctionFailed,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.UserNotLoggedIn,
    p11e.NoSuchToken,
    p11e.SlotIDInvalid,
    p11e.GeneralError,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.CryptokiNotInitialized if hasattr(p11e, "CryptokiNotInitialized") else p11e.GeneralError,
)

# Errors of this process, not of the token (EMFILE, ENOMEM): also worth a fresh start.
_RESOURCE_ERRORS: tuple[type[Exception], ...] = (OSError, MemoryError)
_PIN_ERRORS = (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinInvalid)

#: file descriptors that must be free for the token to be trusted (SoftHSM opens
#: an object file and its lock file per object it reads)
_FD_HEADROOM = 8

_MODULE_LOCKS: dict[str, threading.RLock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def _module_lock(path: str) -> threading.RLock:
    """One lock per library file: no two threads are ever in it at once. Re-entrant, so
    that ``try_enter`` can hold it around calls that take it again."""
    with _MODULE_LOCKS_GUARD:
        return _MODULE_LOCKS.setdefault(os.path.realpath(path), threading.RLock())


@dataclass(frozen=True)
class TokenConfig:
    module: str
    pin_file: str
    token_label: str | None = None
    token_serial: str | None = None


def parse_uri(uri: str) -> dict[str, str]:
    """The path attributes of an RFC 7512 ``pkcs11:`` URI we use (token, serial, module-path)."""
    if not uri.startswith("pkcs11:"):
        raise ValueError("uri: must start with 'pkcs11:'")
    body = uri[len("pkcs11:") :]
    path, _, query = body.partition("?")
    out: dict[str, str] = {}
    for part in [p for p in path.split(";") if p] + [q for q in query.split("&") if q]:
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"uri: attribute {name!r} has no value")
        out[name] = urllib.parse.unquote(value)
    if "pin-value" in out:
        raise ValueError("uri: pin-value is not accepted; use pin_file")
    return out


def from_config(cfg: Mapping[str, Any]) -> Pkcs11Backend:
    allowed = {"type", "module", "token_label", "token_serial", "uri", "pin_file"}
    for key in cfg:
        if key not in allowed:
            raise ValueError(f"{key}: unknown key (known: {', '.join(sorted(allowed))})")
    fields: dict[str, str] = {}
    if "uri" in cfg:
        attrs = parse_uri(str(cfg["uri"]))
        if "token" in attrs:
            fields["token_label"] = attrs["token"]
        if "serial" in attrs:
            fields["token_serial"] = attrs["serial"]
        if "module-path" in attrs:
            fields["module"] = attrs["module-path"]
    for key in ("module", "token_label", "token_serial", "pin_file"):
        if key in cfg:
            if not isinstance(cfg[key], str) or not cfg[key]:
                raise ValueError(f"{key}: must be a non-empty string")
            fields[key] = cfg[key]
    if "module" not in fields:
        raise ValueError("module: required (path to the PKCS#11 library), or module-path in uri")
    if "pin_file" not in fields:
        raise ValueError("pin_file: required (a file holding the user PIN)")
    if "token_label" not in fields and "token_serial" not in fields:
        raise ValueError("token_label: required (or token_serial, or token= in uri)")
    if not os.path.exists(fields["module"]):
        raise ValueError(f"module: no such file: {fields['module']}")
    return Pkcs11Backend(TokenConfig(**fields))


def _read_pin(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            pin = fh.read().strip()
    except OSError as exc:
        raise BackendUnavailable("cannot read the token PIN file") from exc
    if not pin:
        raise BackendUnavailable("the token PIN file is empty")
    return pin


def raw_public_key(ec_point: bytes) -> bytes:
    """The raw 32-byte Ed25519 key from CKA_EC_POINT, DER-wrapped (SoftHSM) or raw."""
    if len(ec_point) == 32:
        return ec_point
    if len(ec_point) == 34 and ec_point[0] == 0x04 and ec_point[1] == 0x20:
        return ec_point[2:]
    raise BackendError("token returned an Ed25519 public key of unexpected form")


def _meta_label(key: KeyName) -> str:
    return f"signerd/{key.tenant}/{key.name}"


def key_of_label(label: str) -> KeyName | None:
    parts = label.split("/")
    if len(parts) != 3 or parts[0] != "signerd":
        return None
    if not all(valid_part(p) and p.isprintable() for p in parts[1:]):
        return None
    return KeyName(parts[1], parts[2])


def label_digest(label: object) -> str:
    """A short, log-safe fingerprint of a token object's label (never the label itself)."""
    raw = (
        label.encode("utf-8", "surrogateescape") if isinstance(label, str) else repr(label).encode()
    )
    return hashlib.sha256(raw).hexdigest()[:16]


def resources_available() -> None:
    """Raise BackendUnavailable unless this process can open files now.

    SoftHSM answers a search with no objects, and no error, when it cannot open
    its object files; an empty listing then says nothing about the keyring.
    """
    fds: list[int] = []
    try:
        for _ in range(_FD_HEADROOM):
            fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        log.error("signerd.pkcs11.no_file_descriptors errno=%s", exc.errno)
        raise BackendUnavailable("the daemon cannot open files (resource limit)") from exc
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(frozen=True)
class _Meta:
    seq: int
    versions: dict[int, tuple[VersionState, int]]  # version -> (state, created_at)

    def encode(self) -> bytes:
        body = {
            "format": _META_FORMAT,
            "seq": self.seq,
            "versions": {
                str(v): {"state": s.value, "created_at": c} for v, (s, c) in self.versions.items()
            },
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> _Meta:
        body = json.loads(raw)
        if body.get("format") != _META_FORMAT:
            raise ValueError("unknown metadata format")
        versions = {
            int(v): (VersionState(d["state"]), int(d["created_at"]))
            for v, d in body["versions"].items()
        }
        return cls(seq=int(body["seq"]), versions=versions)

    def with_states(
        self, changes: Mapping[int, VersionState], created_at: int | None = None
    ) -> _Meta:
        versions = dict(self.versions)
        for version, state in changes.items():
            created = (
                versions[version][1] if version in versions else (created_at or int(time.time()))
            )
            versions[version] = (state, created)
        return _Meta(seq=self.seq + 1, versions=versions)


class Pkcs11Backend:
    """Keys on one PKCS#11 token. Thread-safe: every token call holds the module lock."""

    max_concurrency = 1

    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self._lock = _module_lock(config.module)
        self._session: Any = None
        self._private: dict[str, Any] = {}  # kid -> private key object (valid for this session)
        self._public: dict[str, bytes] = {}  # kid -> raw public key (never changes)
        self._reported: set[str] = set()  # malformed objects already logged (by digest)
        self._listed = 0  # keys in the last listing; a token that then shows none is suspect

    def try_enter(self) -> bool:
        return self._lock.acquire(blocking=False)

    def leave(self) -> None:
        self._lock.release()

    # --- connection -----------------------------------------------------

    def _connect(self) -> Any:
        if self._session is not None:
            return self._session
        pin = _read_pin(self._config.pin_file)
        lib = pkcs11.lib(self._config.module)
        token = self._find_token(lib)
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # Login is per application: another session of this process is logged in.
            session = token.open(rw=True)
        self._session = session
        self._private.clear()
        log.info("signerd.pkcs11.session_open token=%s", token.label)
        return session

    def _find_token(self, lib: Any) -> Any:
        kwargs: dict[str, str | bytes] = {}
        if self._config.token_label:
            kwargs["token_label"] = self._config.token_label
        if self._config.token_serial:
            kwargs["token_serial"] = self._config.token_serial.encode()
        try:
            return lib.get_token(**kwargs)
        except (p11e.NoSuchToken, p11e.MultipleTokensReturned):
            raise
        except p11e.PKCS11Error:
            # The library may have lost its slots (token vanished): start it again.
            lib.reinitialize()
            return lib.get_token(**kwargs)

    def _reset(self) -> None:
        session, self._session = self._session, None
        self._private.clear()
        if session is not None:
            try:
                session.close()
            except Exception:  # the session is already unusable; nothing more to do
                log.debug("signerd.pkcs11.session_close_failed", exc_info=True)
        try:
            pkcs11.lib(self._config.module).reinitialize()
        except Exception:
            log.debug("signerd.pkcs11.reinitialize_failed", exc_info=True)

    def _call(self, fn: Callable[[Any], _T]) -> _T:
        """Run fn(session) under the module lock, translating token errors.

        A connection-class or resource error resets the session and the
        library and retries once on a fresh one (with a new login), which is
        how signerd recovers from a token that vanished and came back, or from
        a moment without file descriptors or memory.
        """
        with self._lock:
            for attempt in (1, 2):
                try:
                    session = self._connect()
                except SignerdError:
                    self._reset()
                    raise
                except _PIN_ERRORS as exc:  # a configuration error, not a moment's trouble
                    log.error("signerd.pkcs11.login_failed error=%s", type(exc).__name__)
                    self._reset()
                    raise BackendUnavailable("the token refused the login") from exc
                except Exception as exc:  # library load, C_Initialize: "not now"
                    log.warning("signerd.pkcs11.connect_failed error=%s", type(exc).__name__)
                    self._reset()
                    raise BackendUnavailable() from exc
                try:
                    return fn(session)
                except SignerdError:
                    raise
                except (*_CONNECTION_ERRORS, *_RESOURCE_ERRORS) as exc:
                    log.warning(
                        "signerd.pkcs11.token_error error=%s attempt=%d",
                        type(exc).__name__,
                        attempt,
                    )
                    self._reset()
                    if attempt == 2:
                        raise BackendUnavailable() from exc
                except _PIN_ERRORS as exc:
                    log.error("signerd.pkcs11.login_failed error=%s", type(exc).__name__)
                    self._reset()
                    raise BackendUnavailable("the token refused the login") from exc
                except p11e.PKCS11Error as exc:
                    log.error("signerd.pkcs11.error error=%s", type(exc).__name__)
                    raise BackendError() from exc
            raise AssertionError("unreachable")

    def _report(self, label: object, reason: str) -> None:
        """Log a malformed object once per process (by a digest of its label, never the label)."""
        digest = label_digest(label)
        if f"{digest}:{reason}" not in self._reported:
            self._reported.add(f"{digest}:{reason}")
            log.warning("signerd.pkcs11.skip_malformed label_sha256=%s reason=%s", digest, reason)

    # --- reading --------------------------------------------------------

    def _meta_objects(
        self, session: Any, key: KeyName | None
    ) -> Iterator[tuple[KeyName, int, Any, _Meta]]:
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.DATA,
            Attribute.APPLICATION: APPLICATION,
        }
        if key is not None:
            template[Attribute.LABEL] = _meta_label(key)
        for obj in session.get_objects(template):
            label = obj[Attribute.LABEL]
            name = key_of_label(label) if isinstance(label, str) else None
            if name is None:
                if isinstance(label, str) and label.startswith("signerd/"):
                    self._report(label, "invalid_name")
                continue
            try:
                meta = _Meta.decode(obj[Attribute.VALUE])
            except (ValueError, KeyError, TypeError, AttributeError):
                self._report(label, "unreadable_metadata")
                continue
            yield name, meta.seq, obj, meta

    def _current_meta(self, session: Any, key: KeyName) -> tuple[_Meta, list[Any]]:
        found = sorted(self._meta_objects(session, key), key=lambda t: t[1])
        if not found:
            raise UnknownKey()
        return found[-1][3], [obj for _, _, obj, _ in found]

    def _public_key(self, session: Any, kid: str) -> bytes:
        raw = self._public.get(kid)
        if raw is None:
            try:
                obj = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=kid)
            except p11e.NoSuchKey as exc:
                raise BackendUnavailable("a version's public key cannot be read") from exc
            raw = raw_public_key(obj[Attribute.EC_POINT])
            self._public[kid] = raw
        return raw

    def _prefetch_public(self, session: Any, kids: set[str]) -> None:
        """Read many public keys in one pass over the token (one search, not one per kid)."""
        for obj in session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}):
            label = obj[Attribute.LABEL]
            if label in kids:
                self._public[label] = raw_public_key(obj[Attribute.EC_POINT])

    def _info(self, session: Any, key: KeyName, meta: _Meta) -> KeyInfo:
        versions = tuple(
            KeyVersion(
                version=v,
                kid=key.kid(v),
                state=state,
                public_key=self._public_key(session, key.kid(v)),
                created_at=created,
            )
            for v, (state, created) in sorted(meta.versions.items())
        )
        return KeyInfo(key=key, versions=versions)

    def list_keys(self) -> list[KeyInfo]:
        def run(session: Any) -> list[KeyInfo]:
            latest: dict[KeyName, _Meta] = {}
            for name, seq, _, meta in self._meta_objects(session, None):
                if name not in latest or latest[name].seq < seq:
                    latest[name] = meta
            wanted = {k.kid(v) for k, m in latest.items() for v in m.versions} - set(self._public)
            if wanted:
                self._prefetch_public(session, wanted)
            infos = []
            for k, m in sorted(latest.items()):
                try:
                    infos.append(self._info(session, k, m))
                except (BackendUnavailable, BackendError):
                    # A version without a readable public key: skip the key, never the answer.
                    self._report(_meta_label(k), "unreadable_public_key")
            if infos:  # an empty listing may be a token that cannot open its files
                self._listed = len(infos)
            return infos

        return self._call(run)

    def describe(self, key: KeyName) -> KeyInfo:
        return self._call(lambda s: self._info(s, key, self._current_meta(s, key)[0]))

    # --- writing --------------------------------------------------------

    def _write_meta(self, session: Any, key: KeyName, meta: _Meta, old: Sequence[Any]) -> None:
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
                Attribute.APPLICATION: APPLICATION,
                Attribute.LABEL: _meta_label(key),
                Attribute.VALUE: meta.encode(),
            }
        )
        for obj in old:
            obj.destroy()

    def _generate(self, session: Any, key: KeyName, version: int) -> int:
        """Generate the key pair for version (or the next free one); return its number."""
        while any(True for _ in session.get_objects({Attribute.LABEL: key.kid(version)})):
            # Left over from an interrupted rotation: that kid is burnt, never reused.
            log.warning("signerd.pkcs11.skip_orphan kid=%s", key.kid(version))
            version += 1
        kid = key.kid(version)
        params = session.create_domain_parameters(
            KeyType.EC_EDWARDS,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
            local=True,
        )
        pub, _ = params.generate_keypair(
            mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            store=True,
            label=kid,
            id=kid.encode(),
            public_template={Attribute.VERIFY: True, Attribute.PRIVATE: False},
            private_template={
                Attribute.SIGN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
            },
        )
        self._public[kid] = raw_public_key(pub[Attribute.EC_POINT])
        return version

    def create(self, key: KeyName) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            if any(True for _ in self._meta_objects(session, key)):
                raise KeyExists()
            version = self._generate(session, key, 1)
            meta = _Meta(seq=1, versions={version: (VersionState.ACTIVE, int(time.time()))})
            self._write_meta(session, key, meta, [])
            return self._info(session, key, meta)

        return self._call(run)

    def rotate(self, key: KeyName, *, pending: bool) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._current_meta(session, key)
            version = self._generate(session, key, max(meta.versions, default=0) + 1)
            changes: dict[int, VersionState] = {}
            if pending:
                changes[version] = VersionState.PENDING
            else:
                changes = _promotion(meta, version)
            new = meta.with_states(changes, created_at=int(time.time()))
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._call(run)

    def set_state(self, key: KeyName, version: int, state: VersionState) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._current_meta(session, key)
            if version not in meta.versions:
                raise UnknownVersion()
            changes = (
                _promotion(meta, version) if state is VersionState.ACTIVE else {version: state}
            )
            new = meta.with_states(changes)
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._call(run)

    def destroy(self, key: KeyName, version: int) -> KeyInfo:
        def run(session: Any) -> KeyInfo:
            meta, old = self._current_meta(session, key)
            if version not in meta.versions:
                raise UnknownVersion()
            kid = key.kid(version)
            for obj in list(
                session.get_objects(
                    {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: kid}
                )
            ):
                obj.destroy()
            self._private.pop(kid, None)
            new = meta.with_states({version: VersionState.DESTROYED})
            self._write_meta(session, key, new, old)
            return self._info(session, key, new)

        return self._call(run)

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
                    raise UnknownVersion("version has no private key on the token") from exc
                self._private[kid] = priv
            return [priv.sign(data, mechanism=Mechanism.EDDSA) for data in items]

        return self._call(run)

    def check(self) -> None:
        def run(session: Any) -> None:
            # A cheap round trip that needs a live, logged-in session; a token that
            # listed keys before and now shows none cannot open its files.
            for _ in session.get_objects(
                {Attribute.CLASS: ObjectClass.DATA, Attribute.APPLICATION: APPLICATION}
            ):
                return
            if self._listed:
                raise BackendUnavailable("the token shows none of its keys")

        resources_available()
        self._call(run)

    # --- recovery ---------------------------------------------------------

    def recover(self) -> None:
        """Start again from nothing: close the session, re-initialise the library, log in."""
        with self._lock:
            self._reset()
        self._call(lambda session: None)

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
            control = present[0]
            meta = self._current_meta(session, control)[0]  # UnknownKey: not healthy
            for version in meta.versions:
                kid = control.kid(version)
                if not any(True for _ in session.get_objects({Attribute.LABEL: kid})):
                    raise BackendUnavailable("a listed key's objects cannot be read")
            gone = set()
            for info in missing:
                labels = [_meta_label(info.key)] + [v.kid for v in info.versions]
                if not any(
                    any(True for _ in session.get_objects({Attribute.LABEL: label}))
                    for label in labels
                ):
                    gone.add(info.key)
            return frozenset(gone)

        try:
            return self._call(run)
        except UnknownKey as exc:
            raise BackendUnavailable("a listed key cannot be read back") from exc

    def close(self) -> None:
        with self._lock:
            session, self._session = self._session, None
            self._private.clear()
            if session is not None:
                try:
                    session.close()
                except p11e.PKCS11Error:
                    log.debug("signerd.pkcs11.session_close_failed", exc_info=True)

    # --- for maintenance, tests and audits ----------------------------------

    def on_token(self, fn: Callable[[Any], _T]) -> _T:
        """Run fn(session) on the token, with this backend's lock, login and error translation."""
        return self._call(fn)

    def private_key_attributes(self, kid: str) -> dict[str, Any]:
        """The security attributes of a version's private key, read back from the token."""
        parse_kid(kid)
        attrs = (
            Attribute.TOKEN,
            Attribute.PRIVATE,
            Attribute.SENSITIVE,
            Attribute.EXTRACTABLE,
            Attribute.KEY_TYPE,
            Attribute.LOCAL,
            Attribute.NEVER_EXTRACTABLE,
            Attribute.ALWAYS_SENSITIVE,
        )

        def run(session: Any) -> dict[str, Any]:
            obj = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=kid)
            return {a.name: obj[a] for a in attrs}

        return self._call(run)


def _promotion(meta: _Meta, version: int) -> dict[int, VersionState]:
    """Make version active and the current active verify-only, as one change."""
    changes = {
        v: VersionState.VERIFY_ONLY
        for v, (s, _) in meta.versions.items()
        if s is VersionState.ACTIVE
    }
    changes[version] = VersionState.ACTIVE
    return changes
