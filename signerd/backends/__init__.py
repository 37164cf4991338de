"""The backend interface: where keys live and signatures are made.

A backend is synchronous (python-pkcs11 and hvac both block); the key service
calls it from an executor it owns; a worker also signs with an ``Inline``
backend (a local library whose calls take microseconds) on its event-loop
thread, under its ``StallGuard``. A backend keeps the keyring (versions and
their states) in the store itself, so that several daemons pointed at the
same token or Vault see the same keys.

The backend persists states; the key service decides which transitions are
allowed (see ``_lifecycle``). Third-party exceptions never leave a backend:
each is translated into the most specific ``signerd.errors`` class with
``raise ... from exc``; credentials the store refuses are ``CredentialsRefused``.

Each backend is a package (``pkcs11``, ``vault``) exporting ``parse_settings``
(validate its configuration table, contacting nothing) and ``build``; the
registry imports it only when a configuration names it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import BackendUnavailable, NotSupported, SignerdError
from ..wire import KeyName
from ..wire import VersionState as VersionState


@dataclass(frozen=True)
class KeyVersion:
    version: int
    kid: str
    state: VersionState
    public_key: bytes  # raw 32-byte Ed25519 public key
    created_at: int  # unix seconds
    #: unix seconds of the last state change (None: written before it was recorded)
    state_changed_at: int | None = None
    #: pending_deletion: unix seconds at which the daemon destroys the version
    deletion_at: int | None = None


@dataclass(frozen=True)
class KeyInfo:
    key: KeyName
    versions: tuple[KeyVersion, ...]  # ascending by version
    #: the version this call made (rotate), when the backend knows it: another process
    #: on the same store may have made a later one meanwhile
    made: int | None = field(default=None, compare=False)

    @functools.cached_property
    def active(self) -> KeyVersion | None:
        """The active version (found once: a sign asks for it every time)."""
        for v in self.versions:
            if v.state is VersionState.ACTIVE:
                return v
        return None

    def version(self, number: int) -> KeyVersion | None:
        for v in self.versions:
            if v.version == number:
                return v
        return None

    @property
    def latest(self) -> int:
        return self.versions[-1].version if self.versions else 0


class Backend(Protocol):
    """What every backend provides. All methods block; all may raise SignerdError."""

    #: how many calls may run at once (1 for PKCS#11: the token is serialised)
    max_concurrency: int

    def list_keys(self) -> list[KeyInfo]:
        """Read the whole keyring from the store (no cache)."""
        ...

    def describe(self, key: KeyName) -> KeyInfo:
        """Read one key from the store; UnknownKey when it does not exist."""
        ...

    def create(self, key: KeyName) -> KeyInfo:
        """Create a key whose version 1 is active; KeyExists when it exists."""
        ...

    def rotate(self, key: KeyName, *, pending: bool) -> KeyInfo:
        """Add the next version.

        pending=False: the new version becomes active and the previous active
        version verify-only, in one step as seen by readers.
        pending=True: the new version is pending; the active one is unchanged.
        """
        ...

    def set_state(self, key: KeyName, version: int, state: VersionState) -> KeyInfo:
        """Persist a state change the key service has validated.

        Setting a pending version ACTIVE demotes the current active version to
        verify-only in the same step. DESTROYED goes through ``destroy``.
        """
        ...

    def sign(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError]:
        """Sign each item with one named version; per-item errors in place."""
        ...

    def check(self) -> None:
        """Raise BackendUnavailable (or a subclass) unless the store is usable now."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Destroyer(Protocol):
    """Optional: remove a version's private material for good."""

    def destroy(self, key: KeyName, version: int) -> KeyInfo: ...


@runtime_checkable
class DeletionScheduler(Protocol):
    """Optional: a retired version's deletion scheduled and cancelled (``pending_deletion``).

    The store keeps the time (``deletion_at``), so every daemon on it agrees;
    the destroy itself, when it is due, is ``Destroyer.destroy``.
    """

    def schedule_deletion(self, key: KeyName, version: int, at: int) -> KeyInfo:
        """Move a retired version to pending_deletion, to be destroyed at ``at``."""
        ...

    def cancel_deletion(self, key: KeyName, version: int) -> KeyInfo:
        """Move a pending_deletion version back to retired."""
        ...


@runtime_checkable
class Locator(Protocol):
    """A backend whose objects other tools can find: each version's RFC 7512 URI."""

    def object_uri(self, kid: str) -> str: ...


@runtime_checkable
class Recoverable(Protocol):
    """Optional: start the connection to the store again, and prove keys gone.

    The key service never forgets a key because a listing lacks it. It calls
    ``recover`` and reads again; keys still missing are forgotten only when
    ``confirm_absent`` returns them. A backend without this protocol proves a
    key gone when ``describe`` raises UnknownKey for it.
    """

    def recover(self) -> None:
        """Drop sessions and connections and set them up again (PKCS#11: re-initialise, log in)."""
        ...

    def confirm_absent(
        self, missing: Sequence[KeyInfo], present: Sequence[KeyName]
    ) -> frozenset[KeyName]:
        """Of the keys missing from a listing, those the store positively says are gone.

        Raise BackendUnavailable when the store cannot be trusted right now.
        ``present`` are keys the same listing returned (evidence the store reads).
        """
        ...


@runtime_checkable
class Revalidating(Protocol):
    """Optional: tell cheaply (no search) whether the keys listed last are unchanged."""

    def unchanged(self) -> bool:
        """True when no key of the last listing changed; False on any doubt."""
        ...


@runtime_checkable
class Opening(Protocol):
    """Optional: a library and a session that the first call would open, opened ahead of
    it (a worker tells its supervisor once it has, and the next worker starts its own)."""

    def open(self) -> None:
        """Open what the first call would; raise what it would."""
        ...


@runtime_checkable
class Inline(Protocol):
    """Optional: calls are short calls into a local library, which a worker may make on
    its event loop's thread (no hand-off to the executor and back) while no other thread
    is in the library. A call that never returns is the worker's ``StallGuard``'s."""

    def try_enter(self) -> bool:
        """Hold the library for this thread if nobody else does (never waits)."""
        ...

    def leave(self) -> None:
        """Give back what ``try_enter`` took."""
        ...


@runtime_checkable
class LoopSigning(Protocol):
    """Optional: signs over the network from the event loop itself, without a thread.

    ``sign_on_loop`` never blocks the loop. It returns None when this call has to go
    the blocking way (``sign`` in the executor): a login or a check due, no connection
    to spare, or any answer but a good one, which ``sign`` then retries, fails over and
    translates. A store that does not answer in time raises BackendUnavailable."""

    async def sign_on_loop(
        self, key: KeyName, version: int, items: Sequence[bytes]
    ) -> list[bytes | SignerdError] | None: ...


class CredentialsRefused(BackendUnavailable):
    """The store refused signerd's credentials (a PIN, a Vault token), or has no token by
    the configured name: at start-up a configuration error (exit 78), not an outage to
    wait out. On the wire it is ``backend_unavailable``, like any other unavailability.

    ``reason`` names what refused (an exception class name, e.g. ``PinIncorrect``); it
    never carries a PIN, a token or a path.
    """

    def __init__(self, message: str | None = None, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BackendPackage(Protocol):
    """What a backend package exports for the registry."""

    def parse_settings(self, table: Mapping[str, Any]) -> Any:
        """Validate a backend table; ValueError names the bad key. Contacts nothing."""
        ...

    def build(self, settings: Any) -> Backend:
        """The backend for settings ``parse_settings`` returned."""
        ...


@dataclass(frozen=True)
class BackendType:
    """One registry entry: a backend type, its package imported only when used."""

    name: str
    package: str

    def load(self) -> BackendPackage:
        """The backend's package; a missing optional dependency is a clear NotSupported
        naming the extra to install, never an ImportError at start-up."""
        try:
            module: BackendPackage = importlib.import_module(self.package)
        except ImportError as exc:
            raise NotSupported(
                f"backend {self.name!r} needs an optional dependency: "
                f"the {self.name!r} extra of the signerd wheel ({exc.name})"
            ) from exc
        return module

    def parse(self, table: Mapping[str, Any]) -> Any:
        """Validate a backend table without contacting the store (ValueError names the key)."""
        return self.load().parse_settings(table)

    def build(self, settings: Any) -> Backend:
        """The backend for what ``parse`` returned (may contact the store)."""
        return self.load().build(settings)


BackendFactory = Callable[[Mapping[str, Any]], Backend]

#: backend type name -> its package; imported only when configured
_REGISTRY: dict[str, BackendType] = {
    "pkcs11": BackendType("pkcs11", "signerd.backends.pkcs11"),
    "vault": BackendType("vault", "signerd.backends.vault"),
}


def backend_types() -> list[str]:
    return sorted(_REGISTRY)


def backend_type(kind: str) -> BackendType:
    """The registry entry for a backend type; NotSupported for an unknown one."""
    entry = _REGISTRY.get(kind)
    if entry is None:
        raise NotSupported(f"unknown backend type {kind!r}; known: {', '.join(backend_types())}")
    return entry


def load_factory(kind: str) -> BackendFactory:
    """A factory (table -> backend: ``parse`` then ``build``), its package imported now.

    A missing optional dependency becomes a clear error naming the extra to
    install, never an ImportError at start-up.
    """
    entry = backend_type(kind)
    package = entry.load()

    def factory(table: Mapping[str, Any]) -> Backend:
        return package.build(package.parse_settings(table))

    return factory
