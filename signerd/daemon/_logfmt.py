"""stderr log lines in logfmt: ``ts=… level=… logger=… event key=value …``.

- ``ts``: UTC, RFC 3339 with milliseconds and ``Z``.
- Each %-argument of a record that is not a number is made a logfmt value
  before the message is formatted: quoted when it is empty or holds a space,
  ``=``, ``"``, ``\\`` or a control character (``\\"``, ``\\\\``, ``\\n``, ``\\t``,
  ``\\uXXXX`` inside the quotes), and cut to ``MAX_VALUE`` characters, so what
  an argument holds can neither split a line nor forge a key.
- A traceback goes in one quoted ``exc=`` value.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

__all__ = ["LogfmtFormatter", "logfmt_value"]

MAX_VALUE = 512  # characters of one value; longer ones end in "…"
_BARE_RE = re.compile(r"[^\s=\"\\\x00-\x1f\x7f-\x9f]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_LEVELS = {"WARNING": "warning", "CRITICAL": "critical"}


def logfmt_value(value: object) -> str:
    """``value`` as one logfmt value: bare when it can be, else quoted and escaped."""
    text = str(value)
    if len(text) > MAX_VALUE:
        text = text[:MAX_VALUE] + "…"
    if _BARE_RE.fullmatch(text):
        return text
    escaped = "".join(
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c)
        for c in text
    )
    return f'"{escaped}"'


def _arg(value: object) -> object:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # %d and %.3f need the number; a number needs no quoting
    return logfmt_value(value)


def quoted_message(record: logging.LogRecord) -> str:
    """The record's message with each non-number argument made a logfmt value."""
    args: Any = record.args
    if not args:
        return str(record.msg)
    if isinstance(args, dict):
        return str(record.msg) % {k: _arg(v) for k, v in args.items()}
    return str(record.msg) % tuple(_arg(a) for a in args)


def utc_timestamp(created: float) -> str:
    """``created`` as RFC 3339 UTC with milliseconds: 2026-12-06T17:02:03.456Z."""
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


class LogfmtFormatter(logging.Formatter):
    """``ts=… level=… logger=…`` then the quoted message (see the module's docstring)."""

    def __init__(self, *, prefix: bool = True) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = quoted_message(record)
        except (TypeError, ValueError):
            message = f"signerd.bad_log_call msg={logfmt_value(record.msg)}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            message += f" exc={logfmt_value(record.exc_text)}"
        if not self.prefix:
            return message
        level = _LEVELS.get(record.levelname, record.levelname.lower())
        return (
            f"ts={utc_timestamp(record.created)} level={level} "
            f"logger={logfmt_value(record.name)} {message}"
        )
