"""signerd's log lines: plain lines on stderr, or journal entries with fields under systemd.

- ``setup_logging``: journal entries when stderr is the journal
  (``$JOURNAL_STREAM``) and systemd-python is installed; else stderr lines.
- ``JournalHandler``: one entry per record; upper-case record attributes
  become journal fields.

The request log itself is the server's (``signerd.server.log_request``):
``setup_logging`` tells it whether its events go to the journal.
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

from ..server import log_requests_to_journal
from ._logfmt import LogfmtFormatter

__all__ = ["JournalHandler", "setup_logging", "under_journal"]


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


def setup_logging(level: str) -> None:
    """Journal events when stderr is the journal and systemd-python is there; else stderr lines."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    journal = None
    if under_journal():
        with contextlib.suppress(ImportError):
            journal = importlib.import_module("systemd.journal")
    log_requests_to_journal(journal is not None)
    if journal is not None:
        handler = JournalHandler(journal.send)
        handler.setFormatter(LogfmtFormatter(prefix=False))  # the journal keeps time and level
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LogfmtFormatter())
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
