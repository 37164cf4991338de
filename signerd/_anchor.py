"""What keeps the audit trail honest from outside it: anchors and the payload key.

An anchor is one JSON line in a separate append-only file (default: the trail's
path plus ``.anchor``), fsync'd, saying "chain C had record seq N with hash H,
in the file whose first record is seq F with hash G". The trail writes one on a
schedule when the head moved, before it leaves a file (rotation), when it finds
its live file shrunk (``truncated``: a security event) and at shutdown.
``verify_set`` then finds a tail that was removed, edited or rewritten.

The payload key is a per-trail secret in its own file (default ``audit.key``
beside the trail, created 0600): records carry ``payload_hmac``, the
HMAC-SHA256 of each payload's SHA-256 digest under that key, so a guessable
payload cannot be recovered from the trail, while an auditor who holds the key
can still check one (``signerctl audit payload-hash --key FILE < payload``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from ._readfile import NotRegularFile, bounded_lines, open_regular

__all__ = [
    "Anchor",
    "AnchorLog",
    "Anchorer",
    "load_key",
    "load_or_create_key",
    "payload_hmac",
    "read_anchors",
]

log = logging.getLogger("signerd.audit")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_TEXT = re.compile(r"[0-9a-f]{64,128}")
_MAX_ANCHOR_LINE = 4096
_LATEST_WINDOW = 256 << 10  # how far back start-up looks for the chain's last anchor
KINDS = ("schedule", "rotated", "truncated", "shutdown")


@dataclass(frozen=True)
class Anchor:
    """One checkpoint of one chain's head, as written to the anchor file."""

    chain: str  # the trail file's name (e.g. audit.jsonl, audit.w0.jsonl)
    kind: str  # one of KINDS
    time: float
    seq: int  # the head record's seq
    head: str  # the head record's hash (SHA-256 of its line)
    first_seq: int  # the first record of the file the head is in
    first_hash: str
    boot: str = ""  # the writing process's boot id
    dev: int = 0
    ino: int = 0

    @property
    def ts(self) -> str:
        when = datetime.fromtimestamp(self.time, UTC)
        return when.isoformat(timespec="seconds")[:-6] + "Z"

    def line(self) -> bytes:
        record = {
            "v": 1,
            "anchor": self.kind,
            "chain": self.chain,
            "boot": self.boot,
            "time": round(self.time, 6),
            "ts": self.ts,
            "seq": self.seq,
            "head": self.head,
            "file": {
                "first_seq": self.first_seq,
                "first_hash": self.first_hash,
                "dev": self.dev,
                "ino": self.ino,
            },
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"

    def journal_fields(self) -> dict[str, str]:
        return {
            "MESSAGE": f"signerd audit anchor {self.kind} {self.chain} seq {self.seq}",
            "PRIORITY": "2" if self.kind == "truncated" else "6",
            "SYSLOG_IDENTIFIER": "signerd",
            "SIGNERD_ANCHOR": self.kind,
            "SIGNERD_ANCHOR_CHAIN": self.chain,
            "SIGNERD_ANCHOR_SEQ": str(self.seq),
            "SIGNERD_ANCHOR_HEAD": self.head,
            "SIGNERD_ANCHOR_FIRST_SEQ": str(self.first_seq),
            "SIGNERD_ANCHOR_FIRST_HASH": self.first_hash,
            "SIGNERD_BOOT": self.boot,
        }


def _parse(line: bytes) -> Anchor | None:
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
    if kind not in KINDS or not isinstance(chain, str) or not chain:
        return None
    if isinstance(when, bool) or not isinstance(when, int | float):
        return None
    boot = rec.get("boot")
    return Anchor(
        chain,
        str(kind),
        float(when),
        int(rec["seq"]),
        str(rec["head"]),
        int(f["first_seq"]),
        str(f["first_hash"]),
        boot if isinstance(boot, str) else "",
        int(f.get("dev", 0)),
        int(f.get("ino", 0)),
    )


def read_anchors(path: str) -> tuple[list[Anchor], list[int]]:
    """The anchors in a file, and the line numbers that are not anchors (a torn last line)."""
    anchors, bad = [], []
    lineno, whole = 0, True
    with open_regular(path) as handle:  # a device or FIFO is refused, never read
        for part in bounded_lines(handle, _MAX_ANCHOR_LINE + 1):
            if whole:  # a line longer than an anchor comes in pieces: one bad line
                lineno += 1
                anchor = _parse(part) if len(part) <= _MAX_ANCHOR_LINE else None
                if anchor is None:
                    bad.append(lineno)
                else:
                    anchors.append(anchor)
            elif bad[-1:] != [lineno]:
                bad.append(lineno)
            whole = part.endswith(b"\n")
    return anchors, bad


class AnchorLog:
    """The append-only anchor file: opened O_APPEND, each anchor one write and one fsync."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def append(self, anchor: Anchor) -> None:
        """Write one anchor durably; OSError when it cannot be (the caller logs it)."""
        if self._fd is not None and self._moved():
            self.close()
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
            self._fd = os.open(self.path, flags, 0o640)
            if self._torn():
                os.write(self._fd, b"\n")  # end a line torn by a crash: this one stays whole
        data = anchor.line()
        try:
            if os.write(self._fd, data) != len(data):
                raise OSError(f"short write to {self.path}")
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                os.fsync(self._fd)
        except OSError:
            self.close()
            raise

    def _torn(self) -> bool:
        """Whether the file ends in a line without its newline (a crash mid-write)."""
        assert self._fd is not None
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return False
        with open(f"/proc/self/fd/{self._fd}", "rb") as handle:
            handle.seek(st.st_size - 1)
            return handle.read(1) != b"\n"

    def _moved(self) -> bool:
        assert self._fd is not None
        try:
            st, mine = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class Anchorer:
    """Writes one chain's anchors: to the anchor file, and to journald when that is on."""

    def __init__(
        self, path: str, chain: str, boot: str, journal_send: Callable[..., object] | None
    ) -> None:
        self.path, self.chain, self.boot = path, chain, boot
        self._log = AnchorLog(path)
        self._journal = journal_send
        self._failing = False
        self.anchored: tuple[int, str] | None = None  # the head the last anchor named

    def anchor(
        self,
        kind: str,
        seq: int,
        head: str,
        first: tuple[int, str] | None,
        ident: tuple[int, int] | None,
    ) -> None:
        """Anchor the head unless it is anchored already (a truncation always); log a failure
        once per streak: anchors are checkpoints, a failing one never refuses a request."""
        if seq == 0 or first is None or ((seq, head) == self.anchored and kind != "truncated"):
            return
        dev, ino = ident or (0, 0)
        self._write(Anchor(self.chain, kind, time.time(), seq, head, *first, self.boot, dev, ino))

    def lost(self, last: Anchor) -> None:
        """Anchor again, as ``truncated``, a head the file no longer holds."""
        self._write(dataclasses.replace(last, kind="truncated", time=time.time(), boot=self.boot))

    def latest(self) -> Anchor | None:
        """This chain's newest anchor among the last lines of the anchor file, if any."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(max(0, handle.seek(0, os.SEEK_END) - _LATEST_WINDOW))
                lines = handle.read(_LATEST_WINDOW).splitlines()
        except OSError:
            return None
        mine = [a for line in lines if (a := _parse(line)) is not None and a.chain == self.chain]
        return max(mine, key=lambda a: a.seq, default=None)

    def _write(self, anchor: Anchor) -> None:
        seq, head = anchor.seq, anchor.head
        try:
            self._log.append(anchor)
        except OSError as exc:
            if not self._failing:
                log.error("signerd.audit_anchor_failed error=%s path=%s", exc, self.path)
            self._failing = True
            return
        if self._failing:
            log.warning("signerd.audit_anchor_recovered path=%s", self.path)
        self._failing, self.anchored = False, (seq, head)
        if self._journal is not None:
            with contextlib.suppress(Exception):  # the anchor file is what verify reads
                self._journal(**anchor.journal_fields())

    def close(self) -> None:
        self._log.close()


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
