"""When a key's active version is due for rotation: ``[keys.max_active_age]``.

Each rule is a ``TENANT/NAME`` pattern (``*`` and ``?``) and a number of
seconds; the first rule in the file whose pattern matches a key gives its
maximum age. An active version older than that is past its rotation due
date: flagged in ``GET /metrics``, ``signerctl status`` and each key's
description (``rotation_due``; readiness is not affected).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from ..backends import KeyInfo
from ._settings import Settings

__all__ = ["Due", "due", "rotation_due"]


@dataclass(frozen=True)
class Due:
    max_age: float  # seconds, from the first matching rule
    at: float  # unix seconds: the active version's creation plus max_age
    overdue: bool


def due(settings: Settings, key: str, created_at: float, now: float) -> Due | None:
    """The rotation due date of ``key`` (TENANT/NAME) whose active version was created at
    ``created_at``; None when no rule names it."""
    for pattern, seconds in settings.max_active_age:
        if fnmatch.fnmatchcase(key, pattern):
            at = created_at + seconds
            return Due(seconds, at, now >= at)
    return None


def rotation_due(settings: Settings, info: KeyInfo, now: float) -> Due | None:
    """``due`` for ``info``'s active version; None without one or without a rule."""
    active = info.active
    if active is None:
        return None
    return due(settings, str(info.key), active.created_at, now)
