"""The key service: a cached keyring over the backends, signing, verifying and key lifecycle."""

from ._age import Due, due, rotation_due
from ._executors import CHANGE_GRACE, run_change
from ._keyring import READY_TTL, Counters
from ._service import PUBLISHED, STARTUP_TIMEOUT, KeyService
from ._settings import Settings

__all__ = [
    "CHANGE_GRACE",
    "PUBLISHED",
    "READY_TTL",
    "STARTUP_TIMEOUT",
    "Counters",
    "Due",
    "KeyService",
    "Settings",
    "due",
    "rotation_due",
    "run_change",
]
