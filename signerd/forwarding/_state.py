"""Where forwarding stands in each chain, kept durably in a small JSON file.

For each chain: the identity (device, inode) of the trail file being read, the
offset after the last record the collector acknowledged, that record's seq,
hash and record id, and the first record of that file (seq and hash: what a
checkpoint names, like an anchor). Written whole to a temporary file, fsync'd
and renamed over the old one after each acknowledged batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields

from ..audit import GENESIS

__all__ = ["Position", "load_state", "save_state"]

log = logging.getLogger("signerd.forwarding")

_MAX_STATE = 1 << 20


@dataclass
class Position:
    """How far one chain was forwarded (and acknowledged)."""

    dev: int = 0
    ino: int = 0
    offset: int = 0  # after the last acknowledged record, in the file (dev, ino)
    seq: int = 0  # that record's seq (0: none yet)
    head: str = GENESIS  # its hash (SHA-256 of its line)
    record_id: str = ""
    first_seq: int = 0  # the first record of the file (dev, ino)
    first_hash: str = GENESIS
    count: int = 0  # records forwarded in this chain, over the forwarder's lifetime


def load_state(path: str) -> dict[str, Position]:
    """The positions saved in ``path`` (none when it is missing or unreadable: logged)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_MAX_STATE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.error("signerd.forwarding_state_unreadable path=%s error=%s", path, exc.strerror)
        return {}
    try:
        doc = json.loads(data) if len(data) <= _MAX_STATE else None
        names = {f.name: f.type for f in fields(Position)}
        found: dict[str, Position] = {}
        for chain, entry in dict(doc or {}).items():
            if not isinstance(entry, dict) or set(entry) != set(names):
                raise ValueError(chain)
            for name, value in entry.items():
                want = str if names[name] == "str" else int
                if type(value) is not want:
                    raise ValueError(name)
            found[str(chain)] = Position(**entry)
        return found
    except (ValueError, TypeError):
        log.critical(
            "signerd.forwarding_state_bad path=%s detail=%s",
            path,
            "not a forwarding state; every chain is forwarded again from the start of its current file",
        )
        return {}


def save_state(path: str, positions: dict[str, Position]) -> None:
    """Write ``positions`` to ``path`` durably (temporary file, fsync, rename)."""
    text = json.dumps({c: asdict(p) for c, p in positions.items()}, sort_keys=True).encode()
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    with contextlib.suppress(OSError):
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
