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

    ``call`` runs a function on the session under the module lock; ``lock`` is
    that lock, for callers that hold the library across calls (``Inline``).
    """

    def __init__(self, config: TokenConfig) -> None:
        self._config = config
        self.lock = _module_lock(config.module)
        self._session: Any = None
        #: kid -> private key object, valid for this session only (emptied with it)
        self.private_keys: dict[str, Any] = {}

    def connect(self) -> Any:
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
        self.private_keys.clear()
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

    def reset(self) -> None:
        session, self._session = self._session, None
        self.private_keys.clear()
        if session is not None:
            try:
                session.close()
            except Exception:  # the session is already unusable; nothing more to do
                log.debug("signerd.pkcs11.session_close_failed", exc_info=True)
        try:
            pkcs11.lib(self._config.module).reinitialize()
        except Exception:
            log.debug("signerd.pkcs11.reinitialize_failed", exc_info=True)

    def call(self, fn: Callable[[Any], _T]) -> _T:
        """Run fn(session) under the module lock, translating token errors.

        A connection-class or resource error resets the session and the
        library and retries once on a fresh one (with a new login), which is
        how signerd recovers from a token that vanished and came back, or from
        a moment without file descriptors or memory.
        """
        with self.lock:
            for attempt in (1, 2):
                try:
                    session = self.connect()
                except SignerdError:
                    self.reset()
                    raise
                except _PIN_ERRORS as exc:
                    raise self._refused(exc) from exc
                except p11e.NoSuchToken as exc:  # no token by the configured label or serial
                    log.warning("signerd.pkcs11.connect_failed error=%s", type(exc).__name__)
                    self.reset()
                    raise CredentialsRefused(reason=type(exc).__name__) from exc
                except (p11e.PKCS11Error, OSError, RuntimeError) as exc:
                    # library load, C_Initialize: "not now" (anything else is a bug of
                    # ours, an internal_error, never a token outage)
                    log.warning("signerd.pkcs11.connect_failed error=%s", type(exc).__name__)
                    self.reset()
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
                    self.reset()
                    if attempt == 2:
                        raise BackendUnavailable() from exc
                except _PIN_ERRORS as exc:
                    raise self._refused(exc) from exc
                except p11e.PKCS11Error as exc:
                    log.error("signerd.pkcs11.error error=%s", type(exc).__name__)
                    raise BackendError() from exc
            raise AssertionError("unreachable")

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
            if session is not None:
                try:
                    session.close()
                except p11e.PKCS11Error:
                    log.debug("signerd.pkcs11.session_close_failed", exc_info=True)
