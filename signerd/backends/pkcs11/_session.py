"""A logged-in session on one PKCS#11 token, and the translation of the library's errors.

Token access is serialised by one lock per PKCS#11 module: python-pkcs11 calls
``C_Initialize(NULL)``, after which SoftHSM takes no locks of its own, and two
threads inside the library at once crash the process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11
from pkcs11 import exceptions as p11e

from ...errors import BackendError, BackendUnavailable, SignerdError
from .. import CredentialsRefused
from ._ladder import REFIND, REOPEN, STEPS, Ladder, TokenVanished
from ._settings import TokenConfig

log = logging.getLogger("signerd.pkcs11")

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

# Errors after which the cached object handles are not to be trusted.
_HANDLE_ERRORS: tuple[type[Exception], ...] = (p11e.ObjectHandleInvalid, p11e.KeyHandleInvalid)

# Errors that say the token is not there: waited out, never a reason to end the process.
_ABSENT_ERRORS: tuple[type[Exception], ...] = (p11e.TokenNotPresent, p11e.DeviceRemoved)

# Errors of this process, not of the token (EMFILE, ENOMEM): also worth a fresh start.
_RESOURCE_ERRORS: tuple[type[Exception], ...] = (OSError, MemoryError)
# A PIN the token refuses: a configuration error, not a moment's trouble.
_PIN_ERRORS = (
    p11e.PinIncorrect,
    p11e.PinLocked,
    p11e.PinExpired,
    p11e.PinInvalid,
    p11e.PinLenRange,
)

_MODULE_LOCKS: dict[str, threading.RLock] = {}
_MODULE_LOCKS_GUARD = threading.Lock()


def _module_lock(path: str) -> threading.RLock:
    """One lock per library file: no two threads are ever in it at once. Re-entrant, so
    that ``try_enter`` can hold it around calls that take it again."""
    with _MODULE_LOCKS_GUARD:
        return _MODULE_LOCKS.setdefault(os.path.realpath(path), threading.RLock())


class _ConnectFailed(Exception):
    """Opening the library, token or session failed with an error worth another try."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(type(cause).__name__)
        self.cause = cause


# Failures the recovery ladder climbs out of.
_CLIMB: tuple[type[Exception], ...] = (
    _ConnectFailed,
    TokenVanished,
    *_CONNECTION_ERRORS,
    *_RESOURCE_ERRORS,
)


def _read_pin(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            pin = fh.read().strip()
    except (FileNotFoundError, PermissionError) as exc:
        raise CredentialsRefused(
            "cannot read the token PIN file", reason=type(exc).__name__
        ) from exc
    except OSError as exc:
        raise BackendUnavailable("cannot read the token PIN file") from exc
    if not pin:
        raise BackendUnavailable("the token PIN file is empty")
    return pin


class TokenSession:
    """One session on the configured token, opened (and logged in) on first use.

    ``call`` runs a function on the session under the module lock, climbing the
    recovery ``Ladder`` when the token fails; ``lock`` is that lock, for callers
    that hold the library across calls (``Inline``). ``open_lib`` loads the
    library (``pkcs11.lib``; tests pass a fault-injecting double).
    """

    def __init__(
        self,
        config: TokenConfig,
        *,
        open_lib: Callable[[str], Any] = pkcs11.lib,
        ladder: Ladder | None = None,
    ) -> None:
        self._config = config
        self._open_lib = open_lib
        self.ladder = ladder or Ladder()
        self.lock = _module_lock(config.module)
        self._session: Any = None
        #: kid -> private key object; kept across sessions (token objects' handles are the
        #: application's), forgotten on the ladder's second rung and with the library
        self.private_keys: dict[str, Any] = {}
        #: key -> its metadata object in the last full listing (``_revalidate``); the same
        self.meta_handles: dict[Any, Any] = {}

    def connect(self) -> Any:
        if self._session is not None:
            return self._session
        pin = _read_pin(self._config.pin_file)
        lib = self._open_lib(self._config.module)
        token = self._find_token(lib)
        try:
            session = token.open(rw=True, user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # Login is per application: another session of this process is logged in.
            session = token.open(rw=True)
        self._session = session
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

    def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            try:
                session.close()
            except Exception:  # the session is already unusable; nothing more to do
                log.debug("signerd.pkcs11.session_close_failed", exc_info=True)

    def reset(self) -> None:
        """The last rung: no session, no handles, the library re-initialised."""
        self._close_session()
        self.private_keys.clear()
        self.meta_handles.clear()
        try:
            self._open_lib(self._config.module).reinitialize()
        except Exception:
            log.debug("signerd.pkcs11.reinitialize_failed", exc_info=True)

    def _step(self, name: str) -> None:
        if name == REOPEN:
            self._close_session()
        elif name == REFIND:
            self._close_session()
            self.private_keys.clear()
            self.meta_handles.clear()
        else:
            self.reset()

    def _open(self) -> Any:
        """The session, or the wire error for a token that cannot be opened; a
        ``_ConnectFailed`` for a failure the ladder may climb out of."""
        try:
            return self.connect()
        except SignerdError:
            self.reset()
            raise
        except _PIN_ERRORS as exc:  # one login attempt: never a retry, never a lockout
            raise self._refused(exc) from exc
        except p11e.NoSuchToken as exc:  # no token by the configured label or serial
            log.warning("signerd.pkcs11.connect_failed error=%s", type(exc).__name__)
            self.reset()
            raise CredentialsRefused(reason=type(exc).__name__) from exc
        except (p11e.PKCS11Error, OSError, RuntimeError) as exc:
            # library load, C_Initialize, a token gone: "not now" (anything else is a
            # bug of ours, an internal_error, never a token outage)
            raise _ConnectFailed(exc) from exc

    def call(self, fn: Callable[[Any], _T]) -> _T:
        """Run fn(session) under the module lock, translating token errors.

        A lost session, token or handle, a resource error, or a token that shows
        less than it holds (``TokenVanished``) climbs the ladder: a new session,
        then handles found again, then the library re-initialised, each tried once
        with a short pause between; when all fail the call is answered
        ``BackendUnavailable`` (503), never a missing key.
        """
        with self.lock:
            rung: int | None = None
            while True:
                opened = False
                try:
                    session = self._open()
                    opened = True
                    result = fn(session)
                except SignerdError:
                    raise
                except _PIN_ERRORS as exc:
                    raise self._refused(exc) from exc
                except _CLIMB as exc:
                    cause = exc.cause if isinstance(exc, _ConnectFailed) else exc
                    error = type(cause).__name__
                    if rung is None:
                        rung = self.ladder.first(isinstance(cause, _HANDLE_ERRORS))
                    else:
                        rung += 1
                    if rung >= len(STEPS):
                        reachable = (
                            opened
                            and isinstance(cause, _CONNECTION_ERRORS)
                            and not isinstance(cause, _ABSENT_ERRORS)
                        )
                        self.ladder.exhausted(error, reachable=reachable)
                        raise BackendUnavailable() from cause
                    self._step(self.ladder.take(rung, error))
                except p11e.PKCS11Error as exc:
                    log.error("signerd.pkcs11.error error=%s", type(exc).__name__)
                    raise BackendError() from exc
                else:
                    self.ladder.recovered()
                    return result

    def _refused(self, exc: Exception) -> CredentialsRefused:
        log.error("signerd.pkcs11.login_failed error=%s", type(exc).__name__)
        self.reset()
        return CredentialsRefused("the token refused the login", reason=type(exc).__name__)

    def restart(self) -> None:
        """Start again from nothing: close the session, re-initialise the library, log in."""
        with self.lock:
            self.reset()
        self.call(lambda session: None)

    def close(self) -> None:
        with self.lock:
            session, self._session = self._session, None
            self.private_keys.clear()
            self.meta_handles.clear()
            if session is not None:
                try:
                    session.close()
                except p11e.PKCS11Error:
                    log.debug("signerd.pkcs11.session_close_failed", exc_info=True)
