"""Why signerd did not start, as one line and an exit status (sysexits).

``signerd`` at start-up and ``signerd --check`` describe a failure the same
way, so what the check prints is what the journal would show.
"""

from __future__ import annotations

import os

from .._config import ConfigError
from ..backends import CredentialsRefused
from ..errors import SignerdError
from ._sockets import SocketError
from ._systemd import ActivationError

__all__ = ["describe"]


def _credentials_refused(exc: BaseException) -> str | None:
    """Why a start-up failure is the configuration's fault (a refused PIN/token), or None."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, CredentialsRefused):
            return cause.reason
        cause = cause.__cause__
    return None


def describe(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, the line saying why) for a failure of ours; None for anything else."""
    if isinstance(exc, ConfigError | ActivationError):
        return os.EX_CONFIG, f"configuration error: {exc}"
    if isinstance(exc, SocketError):
        return os.EX_CANTCREAT, f"cannot listen: {exc}"
    if isinstance(exc, SignerdError):
        cause = _credentials_refused(exc)
        if cause is not None:
            return os.EX_CONFIG, f"configuration error: {exc.message} ({cause}); not retrying"
        return os.EX_UNAVAILABLE, f"cannot start: {exc.code}: {exc.message}"
    if isinstance(exc, OSError):
        return os.EX_OSERR, f"cannot start: {exc}"
    return None
