"""The request log: one event per answered request, with journal fields.

``log_request`` logs ``signerd.request rid=… op=… outcome=… status=…`` on the
``signerd.request`` logger, with ``REQUEST_ID``, ``OPERATION``, ``OUTCOME``,
``STATUS`` and ``MESSAGE_ID`` as record attributes (the daemon's journal
handler sends upper-case attributes as journal fields). When the daemon logs
to the journal (``log_requests_to_journal(True)``) every event is logged at
info; otherwise only at debug, so a busy daemon does not flood stderr.
"""

from __future__ import annotations

import logging

__all__ = ["log_request", "log_requests_to_journal"]

request_log = logging.getLogger("signerd.request")

_level = logging.DEBUG


def log_requests_to_journal(journal: bool) -> None:
    """Whether request events go to the journal (info) or only to a debug log."""
    global _level
    _level = logging.INFO if journal else logging.DEBUG


def log_request(rid: str, operation: str, outcome: str, status: int) -> None:
    """One event per answered request: REQUEST_ID, OPERATION, OUTCOME, STATUS.

    ``rid`` is the validated request id, ``operation`` the ``Operation`` value
    of the route (``sign``, ``rotate``, ...; ``health`` for the open routes and
    for requests no route matched), ``outcome`` ``ok`` or an error code from
    the closed set, ``status`` the HTTP status.
    """
    level = _level
    if not request_log.isEnabledFor(level):
        return
    request_log.log(
        level,
        "signerd.request rid=%s op=%s outcome=%s status=%d",
        rid,
        operation,
        outcome,
        status,
        extra={
            "REQUEST_ID": rid,
            "OPERATION": operation,
            "OUTCOME": outcome,
            "STATUS": status,
            "MESSAGE_ID": "5b1b4e3c2f0a4f0e9d7c6a5b4c3d2e1f",
        },
    )
