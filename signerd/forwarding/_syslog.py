"""RFC 5424 syslog messages, framed by octet counting (RFC 6587), and read back.

A message is ``<PRI>1 TIMESTAMP HOSTNAME signerd PROCID MSGID [SD] MSG``: facility 13
(log audit), MSGID ``audit`` (one trail record, MSG its JSON line as written) or
``checkpoint`` (a signed checkpoint, MSG its JSON), and one structured-data element
``signerd@32473`` naming the chain and the record's seq. 32473 is the example private
enterprise number of RFC 5424; the element is only a convenience for filtering, MSG
carries everything a check needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = ["FACILITY", "SD_ID", "Syslog", "frame", "message", "parse"]

FACILITY = 13  # log audit
SD_ID = "signerd@32473"
_NAME = re.compile(r"[!-~]{1,255}")  # PRINTUSASCII, no space
_HEADER = re.compile(
    rb"<([0-9]{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[(?:[^\]\\]|\\.)*\](?:\[(?:[^\]\\]|\\.)*\])*)"
    rb"(?: (.*))?",
    re.DOTALL,
)
_PARAM = re.compile(rb' ([^= \]"]+)="((?:[^"\\]|\\.)*)"')


def _sd_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def header_name(text: str) -> str:
    """A header field (hostname, procid): printable ASCII without spaces, else ``-``."""
    return text if _NAME.fullmatch(text) else "-"


def message(
    *,
    severity: int,
    when: float,
    hostname: str,
    procid: str,
    msgid: str,
    params: dict[str, str],
    msg: bytes,
) -> bytes:
    """One RFC 5424 message (``msg`` is ASCII JSON: MSG-ANY, no BOM needed)."""
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="microseconds")[:-6] + "Z"
    sd = "".join(f' {k}="{_sd_value(v)}"' for k, v in params.items())
    head = (
        f"<{FACILITY * 8 + severity}>1 {stamp} {header_name(hostname)} signerd "
        f"{header_name(procid)} {msgid} [{SD_ID}{sd}] "
    )
    return head.encode("ascii") + msg


def frame(msg: bytes) -> bytes:
    """Octet-counting framing (RFC 6587 3.4.1): ``LENGTH SP MSG``."""
    return str(len(msg)).encode("ascii") + b" " + msg


@dataclass(frozen=True)
class Syslog:
    """A message read back: what a check of forwarded records needs."""

    severity: int
    facility: int
    hostname: str
    procid: str
    msgid: str
    params: dict[str, str]
    msg: bytes


def parse(line: bytes) -> Syslog | None:
    """An RFC 5424 message (one line of what a collector wrote with ``%rawmsg%``), or None."""
    match = _HEADER.fullmatch(line.rstrip(b"\r\n"))
    if match is None:
        return None
    pri = int(match.group(1))
    if pri > 191:
        return None
    params: dict[str, str] = {}
    sd = match.group(7)
    if sd.startswith(b"[" + SD_ID.encode() + b" "):
        for name, value in _PARAM.findall(sd):
            text = re.sub(rb"\\(.)", rb"\1", value)
            params[name.decode("ascii", "replace")] = text.decode("ascii", "replace")
    return Syslog(
        pri % 8,
        pri // 8,
        match.group(3).decode("ascii", "replace"),
        match.group(5).decode("ascii", "replace"),
        match.group(6).decode("ascii", "replace"),
        params,
        match.group(8) or b"",
    )
