"""Intent and outcome records: which operations may have happened without an outcome.

A sign writes an ``intent`` record (caller, key, the kid about to sign, the
payload's keyed hash, request and record ids) durably before its signature
leaves, and its outcome record (``ok`` with the kid that signed, or the
error) after, with the next group write; an admin change writes its intent
before it acts. Both records carry the request id. After a crash, an intent
whose request has no later outcome record means the operation *may* have
happened: for a sign, a signature may have been made (and may have left).
``unfinished`` lists those, for ``signerctl audit verify``'s notes; it
never fails a check (a live trail has intents whose outcome is being
written).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .._files import bounded_lines, open_regular
from ._chain import MAX_REGION

__all__ = ["unfinished"]

_LISTED = 10  # intents without an outcome named one by one; the rest are counted
_HELD = 100_000  # open intents remembered at most (a file of nothing else stays bounded)


def unfinished(paths: Sequence[str]) -> list[str]:
    """Notes on the intent records in ``paths`` that no later record of their request, in
    the same chain and daemon run, completes; [] when every intent has its outcome."""
    intents: dict[str, list[_Intent]] = {}
    held = dropped = 0
    for path, rec in _records(paths, intent=True):
        if held >= _HELD:
            dropped += 1
            continue
        boot, seq = _where(rec)
        kid, op = str(rec.get("kid")), str(rec.get("operation"))
        intents.setdefault(rec["request_id"], []).append(_Intent(path, boot, seq, op, kid))
        held += 1
    for _, rec in _records(paths, intent=False):
        found = intents.get(rec["request_id"])
        if found:
            boot, seq = _where(rec)
            found[:] = [i for i in found if i.boot != boot or i.seq > seq]
    left = sorted(
        ((i, rid) for rid, found in intents.items() for i in found),
        key=lambda x: (x[0].path, x[0].seq),
    )
    notes = [_note(i, rid) for i, rid in left[:_LISTED]]
    more = len(left) - len(notes) + dropped
    if more:
        notes.append(f"{more} more intent record(s) without an outcome")
    return notes


@dataclass(frozen=True)
class _Intent:
    path: str
    boot: str  # the daemon run (and chain) that wrote it: record_id is BOOT-SEQ
    seq: int
    operation: str
    kid: str


def _records(paths: Sequence[str], *, intent: bool) -> Iterator[tuple[str, dict[str, Any]]]:
    """The records of ``paths`` that are intents (or, ``intent`` False, are not)."""
    for path in paths:
        try:
            with open_regular(path) as handle:
                for line in bounded_lines(handle, MAX_REGION + 1):
                    if b'"request_id"' not in line or (b'"outcome":"intent"' in line) != intent:
                        continue
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("request_id"), str):
                        yield path, rec
        except OSError:
            continue  # the chain check reports what cannot be read


def _where(rec: dict[str, Any]) -> tuple[str, int]:
    boot, _, _ = str(rec.get("record_id", "")).rpartition("-")
    seq = rec.get("seq")
    return boot, seq if type(seq) is int else 0


def _note(i: _Intent, rid: str) -> str:
    if i.operation == "sign":
        what = f"a signature may have been made with {i.kid}"
    else:
        what = f"the {i.operation} may have been made"
    return (
        f"{i.path} seq {i.seq}: intent of request {rid} ({i.operation}) has no outcome "
        f"record: {what} (the daemon stopped before recording how it ended)"
    )
