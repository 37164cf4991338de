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
``raise ... from exc``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import NotSupported, SignerdError
from ..wire import VersionState as VersionState
from ..wire._names import KeyName


@dataclass(frozen=True)
class KeyVersion:
    version: int
    kid: str
    state: VersionState
    public_key: bytes  # raw 32-byte Ed25519 public key
    created_at: int  # unix seconds


@dataclass(frozen=True)
class KeyInfo:
    key: KeyName
    versions: tuple[KeyVersion, ...]  # ascending by version

    @property
    def active(self) -> KeyVersion | None:
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


BackendFactory = Callable[[Mapping[str, Any]], Backend]

#: backend type name -> "module:factory"; imported only when configured
_REGISTRY: dict[str, str] = {
    "pkcs11": "signerd.backends.pkcs11._backend:from_config",
    "vault": "signerd.backends.vault._backend:from_config",
}


def backend_types() -> list[str]:
    return sorted(_REGISTRY)


def load_factory(kind: str) -> BackendFactory:
    """The factory for a backend type, imported lazily.

    A missing optional dependency becomes a clear error naming the extra to
    install, never an ImportError at start-up.
    """
    target = _REGISTRY.get(kind)
    if target is None:
        raise NotSupported(f"unknown backend type {kind!r}; known: {', '.join(backend_types())}")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise NotSupported(
            f"backend {kind!r} needs an optional dependency: pip install 'signerd[{kind}]' ({exc.name})"
        ) from exc
    factory: BackendFactory = getattr(module, attr)
    return factory
