"""signerd's log lines: plain lines on stderr, or journal entries with fields under systemd.

- ``setup_logging``: journal entries when stderr is the journal
  (``$JOURNAL_STREAM``) and systemd-python is installed; else stderr lines.
- ``JournalHandler``: one entry per record; upper-case record attributes
  become journal fields.
- ``log_request``: one event per answered request (``REQUEST_ID``,
  ``OPERATION``, ``OUTCOME``, ``STATUS``): in the journal always, on stderr
  only at debug level.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["JournalHandler", "log_request", "setup_logging", "under_journal"]

request_log = logging.getLogger("signerd.request")

# fields a log record may carry to the journal (journald accepts only these)
_FIELD_RE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def under_journal() -> bool:
    """True when stderr is connected to journald (systemd sets ``$JOURNAL_STREAM``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    m = re.fullmatch(r"([0-9]+):([0-9]+)", stream)
    if m is None:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(m[1]), int(m[2]))


class JournalHandler(logging.Handler):
    """One journal entry per record; upper-case record attributes become fields."""

    def __init__(self, send: Callable[..., Any], identifier: str = "signerd") -> None:
        super().__init__()
        self._send = send
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                k: str(v) for k, v in record.__dict__.items() if _FIELD_RE.fullmatch(k) is not None
            }
            self._send(
                self.format(record),
                PRIORITY=str(_priority(record.levelno)),
                SYSLOG_IDENTIFIER=self._identifier,
                LOGGER=record.name,
                **fields,
            )
        except Exception:
            self.handleError(record)


def _priority(levelno: int) -> int:
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


_journal_events = False


def setup_logging(level: str) -> None:
    """Journal events when stderr is the journal and systemd-python is there; else stderr lines."""
    global _journal_events
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    journal = None
    if under_journal():
        with contextlib.suppress(ImportError):
            journal = importlib.import_module("systemd.journal")
    _journal_events = journal is not None
    if journal is not None:
        handler = JournalHandler(journal.send)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))


def log_request(rid: str, operation: str, outcome: str, status: int) -> None:
    """One event per answered request: REQUEST_ID, OPERATION, OUTCOME, STATUS.

    ``rid`` is the validated request id, ``operation`` a route name
    (``sign``, ``keys.rotate``, ...), ``outcome`` ``ok`` or an error code from
    the closed set, ``status`` the HTTP status. In the journal always (at info);
    on stderr only at debug level, so a busy daemon does not flood it.
    """
    level = logging.INFO if _journal_events else logging.DEBUG
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
