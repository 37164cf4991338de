"""The audit chain: how a record is encoded, and how a file's records link.

Each record carries ``seq`` and ``prev``, the SHA-256 (hex) of the previous
record's line without its newline; the first record ever has ``seq`` 1 and
``prev`` of 64 zeros. A file that continues the chain of another one (after
log rotation) starts with a record whose ``rotated_from`` equals its ``prev``.

How a record is written (``encode_record``) and sent to the journal
(``journal_fields``) is here too; ``_check`` checks files with the ``Walker``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

from ..authz import Peer
from ..wire import MESSAGE_IDS
from ._anchor import GENESIS, payload_hmac
from ._events import AuditEvent

__all__ = [
    "GENESIS",
    "MAX_REGION",
    "VerifyReport",
    "Walker",
    "encode_record",
    "journal_fields",
    "line_hash",
    "split_lines",
    "walk",
]

MAX_REGION = 64 << 20  # unaccounted bytes a writer or verifier will hold


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    records: int
    first_bad_line: int | None = None
    problem: str | None = None
    path: str | None = None  # the file the problem is in, for several files
    anchors: int = 0  # anchors checked against the files
    head_seq: int | None = None  # the latest anchored seq, when anchors were given
    notes: tuple[str, ...] = ()  # findings that do not fail the check


def line_hash(line: bytes) -> str:
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


class Walker:
    """Follows a chain line by line; the writer's recovery and the verifier share it.

    A line that does not continue the chain is held as unaccounted; a later
    record that continues the chain must name exactly those bytes in its
    ``discarded`` field, else they stay unaccounted (and the file is bad).
    """

    def __init__(self, prev: str | None, seq: int, *, file_start: bool) -> None:
        self.prev, self.seq = prev, seq  # prev None: predecessor unknown
        self.file_start = file_start  # the next record is the first of its file
        self.prev_line: int | None = None
        self.records = 0
        self.first: tuple[int, str, str] | None = None  # seq, prev, own hash
        self.accepted: list[int] = []
        self.pending = bytearray()
        self.pending_line: int | None = None
        self.pending_problem: str | None = None

    def feed(self, line: bytes, lineno: int) -> None:
        problem, seq, prev = self._check(line)
        if problem is None:
            self.prev, self.seq, self.prev_line = line_hash(line), seq, lineno
            if self.first is None:
                self.first = (seq, prev, self.prev)
            self.file_start = False
            self.records += 1
            self.accepted.append(seq)
            self.pending.clear()
            self.pending_line = self.pending_problem = None
            return
        if self.pending_line is None:
            self.pending_line, self.pending_problem = lineno, problem
        self.pending += line

    def _check(self, line: bytes) -> tuple[str | None, int, str]:
        if not line.endswith(b"\n"):
            return "unterminated record at the end of the file (a write that failed?)", 0, ""
        try:
            rec = json.loads(line)
        except ValueError:
            return "not a JSON record", 0, ""
        if not isinstance(rec, dict) or type(rec.get("seq")) is not int:
            return "not an audit record", 0, ""
        seq, prev = rec["seq"], rec.get("prev")
        starts = (seq == 1 and prev == GENESIS) or rec.get("rotated_from") == prev
        if self.file_start and not starts:
            return f"the chain does not start here (seq {seq}): earlier records were removed", 0, ""
        if self.prev is None:
            pass
        elif seq != self.seq + 1:
            return (
                (
                    f"seq {seq} where {self.seq + 1} was expected: records were deleted, "
                    "inserted or reordered here"
                ),
                0,
                "",
            )
        elif prev != self.prev:
            before = (
                f"line {self.prev_line}" if self.prev_line else "the previous file's last record"
            )
            return (
                f"prev is not the hash of {before}: it was edited, or a record was inserted",
                0,
                "",
            )
        discarded = rec.get("discarded")
        if self.pending:
            want = {"bytes": len(self.pending), "sha256": hashlib.sha256(self.pending).hexdigest()}
            if discarded != want:
                return "record does not account for the unaccounted lines before it", 0, ""
        elif discarded is not None:
            return "record names discarded bytes that are not there", 0, ""
        return None, seq, str(prev)


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their b"\\n", split the way reading the file in binary splits them."""
    lines = [part + b"\n" for part in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def encode_record(
    event: AuditEvent,
    seq: int,
    prev: str,
    marks: Mapping[str, object],
    record_id: str = "",
    key: bytes | None = None,
) -> bytes:
    """One record's line: v2 carries record_id and payload_hmac (v1 had payload_sha256)."""
    if not marks:
        fast = _fast_line(event, seq, prev, record_id or f"{seq}", key or b"")
        if fast is not None:
            return fast
    peer = event.peer
    when = event.time if math.isfinite(event.time) else 0.0
    record: dict[str, object] = {
        "v": 2,
        "seq": seq,
        "record_id": record_id or f"{seq}",
        "prev": prev,
        "time": math.floor(when),  # Unix seconds, like every time signerd answers
        "request_id": event.request_id,
        "peer": {
            "pid": peer.pid,
            "uid": peer.uid,
            "gid": peer.gid,
            "groups": list(peer.groups),
            "user": peer.user,
            "unit": peer.unit,
        },
        "operation": event.operation,
        "tenant": event.tenant,
        "key": event.key,
        "kid": event.kid,
        "payload_hmac": [payload_hmac(key or b"", h) for h in event.payload_sha256],
        "outcome": event.outcome,
        "status": event.status,
        "reason": event.reason,
        **({"security": True} if event.security else {}),
        **marks,
    }
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


_PEERS: dict[Peer, str] = {}  # a peer's JSON object, encoded once per connection's peer
_MAX_PEERS = 1024
_text = encode_basestring_ascii  # json.dumps's own string encoder (ensure_ascii)


def _fast_line(event: AuditEvent, seq: int, prev: str, record_id: str, key: bytes) -> bytes | None:
    """``encode_record``'s line without its marks, the same bytes, built from pieces (a
    sign writes two records: the general encoder was most of the writer's CPU); None
    when a field is not of the plain type it has on this path (the general one then)."""
    peer, when, status = event.peer, event.time, event.status
    if type(seq) is not int or type(status) is not int or not math.isfinite(when):
        return None
    fields = (event.key, event.kid, event.tenant, event.reason)
    texts = (event.operation, event.outcome, prev, record_id, event.request_id)
    if not all(v is None or type(v) is str for v in fields) or not all(
        type(v) is str for v in texts
    ):
        return None
    peer_json = _PEERS.get(peer)
    if peer_json is None:
        peer_json = _peer_json(peer)
        if peer_json is None:
            return None
        if len(_PEERS) >= _MAX_PEERS:
            _PEERS.clear()
        _PEERS[peer] = peer_json
    k, kid, tenant, reason = (_text(v) if v is not None else "null" for v in fields)
    op, outcome, prev_t, rid_t, req_t = (_text(v) for v in texts)
    macs = ",".join(_text(payload_hmac(key, h)) for h in event.payload_sha256)
    security = '"security":true,' if event.security else ""
    return (
        f'{{"key":{k},"kid":{kid},"operation":{op},"outcome":{outcome},'
        f'"payload_hmac":[{macs}],"peer":{peer_json},"prev":{prev_t},"reason":{reason},'
        f'"record_id":{rid_t},"request_id":{req_t},{security}"seq":{seq},"status":{status},'
        f'"tenant":{tenant},"time":{math.floor(when)},"v":2}}'
    ).encode()


def _peer_json(peer: Peer) -> str | None:
    ints = (peer.gid, peer.pid, peer.uid, *peer.groups)
    if not all(type(v) is int for v in ints) or not all(
        v is None or type(v) is str for v in (peer.unit, peer.user)
    ):
        return None
    return json.dumps(
        {
            "gid": peer.gid,
            "groups": list(peer.groups),
            "pid": peer.pid,
            "uid": peer.uid,
            "unit": peer.unit,
            "user": peer.user,
        },
        separators=(",", ":"),
        ensure_ascii=True,
    )


def journal_fields(line: bytes) -> dict[str, str]:
    """A record as journal fields: SIGNERD_SEQ, SIGNERD_PEER_UID, ..., and its own hash."""
    record = json.loads(line)
    peer = record.pop("peer")
    record.update({f"peer_{name}": value for name, value in peer.items()})
    status = record["status"]
    fields = {
        "MESSAGE": f"signerd audit {record['operation']} {record['outcome']}",
        "PRIORITY": "4"
        if record.get("security")
        else "6"
        if status < 400
        else "4"
        if status in (401, 403, 429)
        else "5"
        if status < 500
        else "3",
        "SYSLOG_IDENTIFIER": "signerd",
        "MESSAGE_ID": MESSAGE_IDS["audit_record"],
        "SIGNERD_HASH": line_hash(line),  # anchors the file's chain outside the file
    }
    for name, value in record.items():
        text = " ".join(map(str, value)) if isinstance(value, list) else value
        if text is not None and text != "":
            fields[f"SIGNERD_{name.upper()}"] = str(text)
    return fields


def walk(
    walker: Walker, lines: Iterable[bytes], keep: frozenset[int] = frozenset(), found: Any = None
) -> tuple[int, str] | None:
    """Feed every line; keep the hashes of records at the seqs in ``keep`` in ``found``."""
    for lineno, line in enumerate(lines, 1):
        walker.feed(line, lineno)
        if found is not None and walker.prev_line == lineno and walker.seq in keep:
            found[walker.seq] = walker.prev
        if len(walker.pending) > MAX_REGION:
            break
    if walker.pending_line is not None:
        return walker.pending_line, walker.pending_problem or "unaccounted bytes"
    return None
