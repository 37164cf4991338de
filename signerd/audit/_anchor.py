"""What keeps the audit trail honest from outside it: anchors and the payload key.

An anchor is one JSON line in a separate append-only file (default: the trail's
path plus ``.anchor``), fsync'd, saying "chain C had record seq N with hash H,
in the file whose first record is seq F with hash G", with the daemon run and
every chain of that run (one per worker). The trail writes one when a process
starts writing the chain, on a schedule when the head moved, before it leaves a
file (rotation), when it finds its live file shrunk (``truncated``) or deleted
(``deleted``), and at shutdown. An anchor file lost while signerd runs is
started again with a ``recreated`` anchor saying so. ``verify_set`` then finds
a tail that was removed, edited or rewritten, and a chain or an anchor file
that vanished.

The payload key is a per-trail secret in its own file (default ``audit.key``
beside the trail, created 0600): records carry ``payload_hmac``, the
HMAC-SHA256 of each payload's SHA-256 digest under that key, so a guessable
payload cannot be recovered from the trail, while an auditor who holds the key
can still check one (``signerctl audit payload-hash --key FILE < payload``).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from datetime import UTC, datetime

from .._files import NotRegularFile, bounded_lines, open_regular
from ..wire import MESSAGE_IDS

__all__ = [
    "KINDS",
    "RUN",
    "SECURITY_KINDS",
    "Anchor",
    "Lost",
    "load_key",
    "load_or_create_key",
    "parse_anchor",
    "payload_hmac",
    "read_anchors",
]

log = logging.getLogger("signerd.audit")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_RUN = re.compile(r"[0-9a-f]{1,64}")
_KEY_TEXT = re.compile(r"[0-9a-f]{64,128}")
_MAX_ANCHOR_LINE = 32 << 10  # 64 workers' chain names of 255 characters fit
_MAX_CHAINS = 1024
GENESIS = "0" * 64
#: ``start``: a process began writing the chain (seq 0: no record yet); ``deleted``: the live
#: trail file was deleted, not renamed; ``recreated``: the anchor file itself was lost (its
#: ``lost`` says how) and this one starts it again. ``truncated``, ``deleted`` and
#: ``recreated`` are security events: verification requires what they name.
KINDS = ("start", "schedule", "rotated", "truncated", "deleted", "recreated", "shutdown")
SECURITY_KINDS = frozenset({"truncated", "deleted", "recreated"})
LOST_REASONS = ("deleted", "replaced", "truncated", "missing")

#: this daemon run: made once in the process that imports this module first (the
#: supervisor, before it forks), so every worker of one run, restarted ones too, shares it
RUN = secrets.token_hex(8)


@dataclass(frozen=True)
class Lost:
    """What a ``recreated`` anchor says of the anchor file that was lost."""

    reason: str  # one of LOST_REASONS ("missing": found missing at start, the trail not empty)
    anchors: int  # anchors of this chain known to be in it (at least); -1: unknown
    last: Anchor | None  # the last of them, when known


@dataclass(frozen=True)
class Anchor:
    """One checkpoint of one chain's head, as written to the anchor file."""

    chain: str  # the trail file's name (e.g. audit.jsonl, audit.w0.jsonl)
    kind: str  # one of KINDS
    time: float
    seq: int  # the head record's seq (0: the chain has no record yet)
    head: str  # the head record's hash (SHA-256 of its line)
    first_seq: int  # the first record of the file the head is in
    first_hash: str
    boot: str = ""  # the writing process's boot id
    dev: int = 0
    ino: int = 0
    run: str = ""  # the daemon run (shared by its workers)
    chains: tuple[str, ...] = ()  # every chain the run writes (one per worker)
    lost: Lost | None = None  # for ``recreated``

    @property
    def ts(self) -> str:
        when = datetime.fromtimestamp(self.time, UTC)
        return when.isoformat(timespec="seconds")[:-6] + "Z"

    def line(self) -> bytes:
        record: dict[str, object] = {
            "v": 1,
            "anchor": self.kind,
            "chain": self.chain,
            "boot": self.boot,
            "time": round(self.time, 6),  # Unix seconds: the fraction orders a run's anchors
            "seq": self.seq,
            "head": self.head,
            "file": {
                "first_seq": self.first_seq,
                "first_hash": self.first_hash,
                "dev": self.dev,
                "ino": self.ino,
            },
        }
        if self.run:
            record["run"] = self.run
        if self.chains:
            record["chains"] = list(self.chains)
        if self.lost is not None:
            last = self.lost.last
            record["lost"] = {
                "reason": self.lost.reason,
                "anchors": self.lost.anchors,
                "last": None
                if last is None
                else {"time": round(last.time, 6), "seq": last.seq, "head": last.head},
            }
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    def journal_fields(self) -> dict[str, str]:
        return {
            "MESSAGE": f"signerd audit anchor {self.kind} {self.chain} seq {self.seq}",
            "PRIORITY": "2" if self.kind in SECURITY_KINDS else "6",
            "SYSLOG_IDENTIFIER": "signerd",
            "MESSAGE_ID": MESSAGE_IDS["audit_anchor"],
            "SIGNERD_ANCHOR": self.kind,
            "SIGNERD_ANCHOR_CHAIN": self.chain,
            "SIGNERD_ANCHOR_SEQ": str(self.seq),
            "SIGNERD_ANCHOR_HEAD": self.head,
            "SIGNERD_ANCHOR_FIRST_SEQ": str(self.first_seq),
            "SIGNERD_ANCHOR_FIRST_HASH": self.first_hash,
            "SIGNERD_BOOT": self.boot,
            "SIGNERD_RUN": self.run,
            "SIGNERD_ANCHOR_CHAINS": " ".join(self.chains),
        }


def _chain_name(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= 255
        and "/" not in value
        and value.isprintable()
    )


def _parse_lost(value: object) -> Lost | bool | None:
    """A ``lost`` member: Lost, None when absent, False when malformed."""
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("reason") not in LOST_REASONS:
        return False
    count, last = value.get("anchors"), value.get("last")
    if type(count) is not int or count < -1:
        return False
    if last is None:
        return Lost(str(value["reason"]), count, None)
    if not isinstance(last, dict):
        return False
    when, seq, head = last.get("time"), last.get("seq"), last.get("head")
    if isinstance(when, bool) or not isinstance(when, int | float) or type(seq) is not int:
        return False
    if not isinstance(head, str) or not _HEX64.fullmatch(head):
        return False
    return Lost(str(value["reason"]), count, Anchor("", "", float(when), seq, head, 0, GENESIS))


def parse_anchor(line: bytes) -> Anchor | None:
    """One anchor line parsed and checked, or None."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("file"), dict):
        return None
    f = rec["file"]
    ints = (rec.get("seq"), f.get("first_seq"), f.get("dev", 0), f.get("ino", 0))
    texts = (rec.get("head"), f.get("first_hash"))
    if any(type(v) is not int for v in ints) or not all(
        isinstance(t, str) and _HEX64.fullmatch(t) for t in texts
    ):
        return None
    kind, chain, when = rec.get("anchor"), rec.get("chain"), rec.get("time")
    if kind not in KINDS or not _chain_name(chain):
        return None
    if isinstance(when, bool) or not isinstance(when, int | float) or rec["seq"] < 0:
        return None
    run, chains, lost = rec.get("run", ""), rec.get("chains", []), _parse_lost(rec.get("lost"))
    if run and (not isinstance(run, str) or not _RUN.fullmatch(run)):
        return None
    if not isinstance(chains, list) or len(chains) > _MAX_CHAINS:
        return None
    if (
        not all(_chain_name(c) for c in chains)
        or lost is False
        or (lost is None) == (kind == "recreated")
    ):
        return None
    boot = rec.get("boot")
    return Anchor(
        str(chain),
        str(kind),
        float(when),
        int(rec["seq"]),
        str(rec["head"]),
        int(f["first_seq"]),
        str(f["first_hash"]),
        boot if isinstance(boot, str) else "",
        int(f.get("dev", 0)),
        int(f.get("ino", 0)),
        str(run),
        tuple(str(c) for c in chains),
        lost if isinstance(lost, Lost) else None,
    )


def read_anchors(path: str) -> tuple[list[Anchor], list[int]]:
    """The anchors in a file, and the line numbers that are not anchors (a torn last line)."""
    anchors, bad = [], []
    lineno, whole = 0, True
    with open_regular(path) as handle:  # a device or FIFO is refused, never read
        for part in bounded_lines(handle, _MAX_ANCHOR_LINE + 1):
            if whole:  # a line longer than an anchor comes in pieces: one bad line
                lineno += 1
                anchor = parse_anchor(part) if len(part) <= _MAX_ANCHOR_LINE else None
                if anchor is None:
                    bad.append(lineno)
                else:
                    anchors.append(anchor)
            elif bad[-1:] != [lineno]:
                bad.append(lineno)
            whole = part.endswith(b"\n")
    return anchors, bad


def load_key(path: str) -> bytes:
    """The payload key from its file (hex); ValueError says what is wrong with it
    (NotRegularFile, an OSError, for a device, FIFO or socket: nothing is read from it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path)
        if st.st_mode & 0o007:
            raise ValueError(f"{path}: readable or writable by others; chmod o-rwx it")
        text = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not _KEY_TEXT.fullmatch(text) or len(text) % 2:
        raise ValueError(f"{path}: not a payload key (64 to 128 lowercase hex digits)")
    return bytes.fromhex(text)


def load_or_create_key(path: str) -> bytes:
    """Read the payload key, or create it (32 random bytes, hex, mode 0600) when missing."""
    try:
        return load_key(path)
    except FileNotFoundError:
        pass
    key = secrets.token_bytes(32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), 0o750, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:  # another worker made it first
        return load_key(path)
    try:
        os.write(fd, key.hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod=hashlib.sha256)


def payload_hmac(key: bytes, sha256_hex: str) -> str:
    """HMAC-SHA256 under the trail's key of a payload's SHA-256 digest (given as hex)."""
    try:
        digest = bytes.fromhex(sha256_hex)
    except ValueError:
        digest = sha256_hex.encode()
    mac = _keyed(key).copy()  # the key's pads hashed once, not once per payload
    mac.update(digest)
    return mac.hexdigest()
