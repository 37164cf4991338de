"""Reading audit trails for people: records of several files merged in time order, filtered.

Used by ``signerctl audit show`` and ``audit tail``. The files are read directly (they
are local); nothing here checks the chain (``audit verify`` does). The reader is
tolerant: a line that is not a JSON object, or longer than ``MAX_LINE`` bytes, is
skipped and counted; a record of a kind it does not know (no ``operation``) is shown
with the fields it has. Each record read is a JSON object from the file, with
``"file"`` added.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any, BinaryIO

from .._files import bounded_lines, open_regular

MAX_LINE = 1 << 20  # a longer line is skipped (signerd's records are far smaller)

_RELATIVE = re.compile(r"([0-9]{1,9})([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RFC3339 = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2})(?:[T ]([0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]{1,9})?)?))?(Z|[+-][0-9]{2}:[0-9]{2})?"
)


def parse_when(text: str, now: float | None = None) -> float:
    """A time: unix seconds, RFC 3339 (a date alone is its midnight; no zone means UTC),
    or an age (``90s``, ``30m``, ``24h``, ``7d``: that long before now). ValueError else."""
    now = time.time() if now is None else now
    if re.fullmatch(r"[0-9]{1,12}(\.[0-9]{1,9})?", text):
        return float(text)
    rel = _RELATIVE.fullmatch(text)
    if rel:
        return now - int(rel.group(1)) * _UNITS[rel.group(2)]
    m = _RFC3339.fullmatch(text)
    if not m:
        raise ValueError(f"not a time: {text[:64]!r} (RFC 3339, unix seconds, or 30m/24h/7d)")
    from datetime import datetime

    day, clock, zone = m.group(1), m.group(2) or "00:00", m.group(3) or "Z"
    if clock.count(":") == 1:
        clock += ":00"
    stamp = f"{day}T{clock}{'+00:00' if zone == 'Z' else zone}"
    try:
        parsed = datetime.fromisoformat(stamp)
    except ValueError:
        raise ValueError(f"not a time: {text[:64]!r}") from None
    return parsed.astimezone(UTC).timestamp()


@dataclass
class Filter:
    """Which records to show; every given criterion must hold."""

    since: float | None = None
    until: float | None = None
    tenants: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # fnmatch patterns on the key (TENANT/NAME)
    kids: tuple[str, ...] = ()
    callers: tuple[str, ...] = ()  # uid or user name
    units: tuple[str, ...] = ()  # fnmatch patterns on the caller's systemd unit
    operations: tuple[str, ...] = ()
    outcome: str | None = None  # "ok", "refused" (answered 4xx/5xx), or an outcome as written
    codes: tuple[str, ...] = ()

    def __call__(self, rec: dict[str, Any]) -> bool:
        t = _time_of(rec)
        if self.since is not None and (t is None or t < self.since):
            return False
        if self.until is not None and (t is None or t > self.until):
            return False
        outcome = rec.get("outcome")
        peer = _peer(rec)
        checks = (
            (self.tenants, lambda: _listed(rec.get("tenant")) & set(self.tenants)),
            (self.keys, lambda: any(_matches(k, self.keys) for k in _listed(rec.get("key")))),
            (self.kids, lambda: _listed(rec.get("kid")) & set(self.kids)),
            (
                self.callers,
                lambda: {str(peer.get("uid")), str(peer.get("user"))} & set(self.callers),
            ),
            (self.units, lambda: _matches(peer.get("unit"), self.units)),
            (self.operations, lambda: rec.get("operation") in self.operations),
            (self.codes, lambda: outcome in self.codes),
        )
        if not all(bool(test()) for wanted, test in checks if wanted):
            return False
        if self.outcome == "refused":
            return refused(rec)
        return self.outcome is None or outcome == self.outcome


def refused(rec: dict[str, Any]) -> bool:
    """Whether a record is of a call answered with an error (its status is 4xx or 5xx); an
    intent record (status 0) or one of a kind without a status is not."""
    status = rec.get("status")
    return isinstance(status, int) and not isinstance(status, bool) and status >= 400


def _peer(rec: dict[str, Any]) -> dict[str, Any]:
    peer = rec.get("peer")
    return peer if isinstance(peer, dict) else {}


def _listed(value: Any) -> set[str]:
    """A record field as a set (a batch's fields list several, comma-separated)."""
    return set(value.split(",")) if isinstance(value, str) else set()


def _matches(value: Any, patterns: Iterable[str]) -> bool:
    return isinstance(value, str) and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _time_of(rec: dict[str, Any]) -> float | None:
    t = rec.get("time")
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    ts = rec.get("ts")
    if isinstance(ts, str):
        try:
            return parse_when(ts)
        except ValueError:
            return None
    return None


@dataclass
class Skipped:
    """Lines that were not records: how many, and where the first few were."""

    count: int = 0
    where: list[str] = field(default_factory=list)

    def add(self, path: str, line: int) -> None:
        self.count += 1
        if len(self.where) < 5:
            self.where.append(f"{path} line {line}")


def parse_lines(
    lines: Iterable[bytes], path: str, skipped: Skipped, first_line: int = 1
) -> Iterator[dict[str, Any]]:
    """The records among ``lines`` (each with ``"file"``); others are counted in ``skipped``."""
    for n, raw in enumerate(lines, first_line):
        if not raw.strip():
            continue
        try:
            if not raw.endswith(b"\n") and len(raw) >= MAX_LINE:
                raise ValueError("too long")
            rec = json.loads(raw)
        except ValueError:
            skipped.add(path, n)
            continue
        if not isinstance(rec, dict):
            skipped.add(path, n)
            continue
        rec["file"] = path
        yield rec


def _whole_lines(handle: BinaryIO) -> Iterator[bytes]:
    """Lines of at most MAX_LINE bytes; the rest of a longer line is dropped."""
    long = False
    for piece in bounded_lines(handle, MAX_LINE):
        if long:
            long = not piece.endswith(b"\n")
            continue
        if not piece.endswith(b"\n") and len(piece) >= MAX_LINE:
            long = True
        yield piece


def read_file(path: str, skipped: Skipped) -> Iterator[dict[str, Any]]:
    with open_regular(path) as handle:
        yield from parse_lines(_whole_lines(handle), path, skipped)


def merged(paths: list[str], skipped: Skipped) -> Iterator[dict[str, Any]]:
    """The records of ``paths`` in time order (each file is in its own order already)."""
    streams = [
        ((_time_of(r) or 0.0, i, n, r) for n, r in enumerate(read_file(p, skipped)))
        for i, p in enumerate(paths)
    ]
    for _, _, _, rec in heapq.merge(*streams, key=lambda item: item[:3]):
        yield rec


def human(rec: dict[str, Any]) -> str:
    """One record as a line: time, operation, outcome, key or kid, caller, request id."""
    t = _time_of(rec)
    when = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"
        if t is not None
        else "-"
    )
    what = rec.get("operation") or rec.get("kind") or rec.get("event") or "?"
    outcome = rec.get("outcome") or "-"
    peer = _peer(rec)
    caller = f"uid={peer.get('uid', '-')}"
    if peer.get("user"):
        caller += f"({peer['user']})"
    if peer.get("unit"):
        caller += f" unit={peer['unit']}"
    target = rec.get("kid") or rec.get("key") or rec.get("tenant") or "-"
    line = f"{when}  {what:<8} {outcome:<18} {target}  {caller}"
    if rec.get("request_id"):
        line += f"  req={rec['request_id']}"
    if outcome not in ("ok", "-") and rec.get("reason"):
        line += f"  ({rec['reason']})"
    return _printable(line)


def _printable(text: str) -> str:
    """Control characters escaped: a record's text cannot move the terminal's cursor."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def as_json_line(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"))


def file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class Source:
    """One file being followed: the bytes of complete lines read so far. A file replaced
    (rotated, recreated) or cut shorter is read again from its start."""

    CHUNK = 8 << 20  # bytes read at most per call

    def __init__(self, path: str) -> None:
        self.path = path
        self.ident = file_id(path)
        self.offset = 0
        self.line = 1

    def read(self, skipped: Skipped) -> tuple[list[dict[str, Any]], bool]:
        """The records of the complete lines added since the last call (at most CHUNK
        bytes of them), and whether more is there already."""
        ident = file_id(self.path)
        if ident is None:
            return [], False
        if ident != self.ident:
            self.ident, self.offset, self.line = ident, 0, 1
        with open_regular(self.path) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < self.offset:
                self.offset, self.line = 0, 1
            handle.seek(self.offset)
            data = handle.read(min(size - self.offset, self.CHUNK))
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) >= MAX_LINE:  # one line longer than any record: skip it
            skipped.add(self.path, self.line)
            self.offset += len(data)
            return [], True
        lines = data[:cut].splitlines(keepends=True)
        records = list(parse_lines(lines, self.path, skipped, self.line))
        self.offset += cut
        self.line += len(lines)
        return records, len(data) == self.CHUNK
