"""The request log: one event per answered request, with journal fields.

``log_request`` logs ``signerd.request rid=… op=… outcome=… status=…`` on the
``signerd.request`` logger, with ``SIGNERD_REQUEST_ID``, ``SIGNERD_OPERATION``,
``SIGNERD_OUTCOME``, ``SIGNERD_STATUS`` and ``MESSAGE_ID`` as record attributes
(the daemon's journal handler sends upper-case attributes as journal fields;
the names are the audit records' own). When the daemon logs to the journal
(``log_requests_to_journal(True)``) every event is logged at info; otherwise
only at debug, so a busy daemon does not flood stderr. A refused key lifecycle
request (create, rotate, promote, retire, destroy) is logged at info either
way, as ``signerd.key_refused`` with its own MESSAGE_ID.
"""

from __future__ import annotations

import logging

from ..wire import MESSAGE_IDS

__all__ = ["log_request", "log_requests_to_journal"]

request_log = logging.getLogger("signerd.request")

_level = logging.DEBUG
_LIFECYCLE = frozenset({"create", "rotate", "promote", "retire", "destroy"})


def log_requests_to_journal(journal: bool) -> None:
    """Whether request events go to the journal (info) or only to a debug log."""
    global _level
    _level = logging.INFO if journal else logging.DEBUG


def log_request(rid: str, operation: str, outcome: str, status: int) -> None:
    """One event per answered request (see the module's docstring).

    ``rid`` is the validated request id, ``operation`` the ``Operation`` value
    of the route (``sign``, ``rotate``, ...; ``health`` for the open routes and
    for requests no route matched), ``outcome`` ``ok`` or an error code from
    the closed set, ``status`` the HTTP status.
    """
    refused = outcome != "ok" and operation in _LIFECYCLE
    level = logging.INFO if refused else _level
    if not request_log.isEnabledFor(level):
        return
    event = "key_refused" if refused else "request"
    request_log.log(
        level,
        f"signerd.{event} rid=%s op=%s outcome=%s status=%d",
        rid,
        operation,
        outcome,
        status,
        extra={
            "SIGNERD_REQUEST_ID": rid,
            "SIGNERD_OPERATION": operation,
            "SIGNERD_OUTCOME": outcome,
            "SIGNERD_STATUS": status,
            "SIGNERD_EVENT": event,
            "MESSAGE_ID": MESSAGE_IDS[event],
        },
    )
