"""Key lifecycle events at info, the same for every backend: what a change did to a key.

``logged_changes(change, cached, backend_name)`` wraps the key service's
keyring changes: after each one, the key as it was (``cached``) and as it is
are compared, and each difference is one event on the ``signerd.keys`` logger:
``signerd.key_created``, ``key_rotated``, ``key_promoted``, ``key_retired``,
``key_deletion_scheduled``, ``key_destroyed`` with ``key``, ``kid``, ``state``
and ``backend``; under the journal a MESSAGE_ID per event type and
SIGNERD_KEY, SIGNERD_KID, SIGNERD_STATE, SIGNERD_BACKEND fields. Refused lifecycle requests are logged
with the request log (``server.log_request``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from ..backends import Backend, KeyInfo, KeyVersion, VersionState
from ..errors import InvalidState, UnknownVersion
from ..wire import MESSAGE_IDS, KeyName

__all__ = ["lifecycle_events", "logged_changes", "require", "retire_call"]

log = logging.getLogger("signerd.keys")
_T = TypeVar("_T")
Change = Callable[[KeyName, Callable[[Backend], _T]], Awaitable[_T]]

_BY_STATE = {
    VersionState.ACTIVE: "key_promoted",
    VersionState.RETIRED: "key_retired",  # also a cancelled deletion
    VersionState.PENDING_DELETION: "key_deletion_scheduled",
    VersionState.DESTROYED: "key_destroyed",
}


def lifecycle_events(before: KeyInfo | None, after: KeyInfo) -> list[tuple[str, str, str]]:
    """(event, kid, state) for each version ``after`` added or moved to another state."""
    was = {v.version: v.state for v in before.versions} if before is not None else {}
    events: list[tuple[str, str, str]] = []
    for v in after.versions:
        if v.version not in was:
            event = "key_created" if before is None or not was else "key_rotated"
        elif was[v.version] is not v.state and v.state in _BY_STATE:
            event = _BY_STATE[v.state]
        else:
            continue
        events.append((event, v.kid, v.state.value))
    return events


def log_lifecycle(before: KeyInfo | None, after: KeyInfo, backend: str) -> None:
    for event, kid, state in lifecycle_events(before, after):
        log.info(
            "signerd.%s key=%s kid=%s state=%s backend=%s",
            event,
            str(after.key),
            kid,
            state,
            backend,
            extra={
                "MESSAGE_ID": MESSAGE_IDS[event],
                "SIGNERD_EVENT": event,
                "SIGNERD_KEY": str(after.key),
                "SIGNERD_KID": kid,
                "SIGNERD_STATE": state,
                "SIGNERD_BACKEND": backend,
            },
        )


def logged_changes(
    change: Change[_T], cached: Mapping[KeyName, KeyInfo], backend_name: Callable[[str], str]
) -> Change[_T]:
    """``change`` that logs the lifecycle events of each change it makes (see the module)."""

    async def logged(key: KeyName, call: Callable[[Backend], _T]) -> _T:
        before = cached.get(key)
        result = await change(key, call)
        if isinstance(result, KeyInfo):
            log_lifecycle(before, result, backend_name(key.tenant))
        return result

    return logged


def retire_call(key: KeyName, version: int) -> Callable[[Backend], KeyInfo]:
    """The backend call that retires ``version`` of ``key``."""
    return lambda backend: backend.set_state(key, version, VersionState.RETIRED)


def require(info: KeyInfo, version: int, states: set[VersionState], message: str) -> KeyVersion:
    """``version`` of ``info``, when it is in one of ``states``; else UnknownVersion or
    InvalidState(message)."""
    found = info.version(version)
    if found is None:
        raise UnknownVersion()
    if found.state not in states:
        raise InvalidState(message)
    return found
