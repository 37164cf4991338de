"""Checking a set of audit files against the anchors: is anything missing?

The files may come in any order and hold one or several chains (rotated files
of one chain, one chain per worker). Each file's chain is checked on its own;
files are linked by hash (a file's first record's ``prev`` is its
predecessor's last record); anchors name their chain and the first record of
the file their head was in. Then:

- every chain an anchor names must be in the set, in one unbroken stretch (a
  missing middle file is a gap);
- the latest anchor of each chain, every anchor within the stretch, and every
  ``truncated`` anchor must find its record in the set, at its seq, with its
  hash: a removed, edited or rewritten tail, an emptied file, a missing newest
  file or the records a live truncation threw away are reported;
- files before the stretch may be missing (retention deletes the oldest).
"""

from __future__ import annotations

import errno
import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._anchor import Anchor, read_anchors
from ._chain import GENESIS, MAX_REGION, VerifyReport, Walker, walk
from ._readfile import NotRegularFile, bounded_lines, open_regular

__all__ = ["audit_files", "find_anchors", "verify_set"]


@dataclass
class _File:
    path: str
    records: int
    first: tuple[int, str, str] | None  # seq, prev, own hash
    last: tuple[int, str] | None  # seq, own hash
    hashes: dict[int, str]  # own hash of the records at anchored seqs
    next: _File | None = None
    linked: bool = False  # some file's last record is this one's predecessor


@dataclass
class _Group:
    """Files that follow each other by hash: one stretch of one chain."""

    files: list[_File] = field(default_factory=list)

    @property
    def first_seq(self) -> int:
        return self.files[0].first[0] if self.files[0].first else 0

    @property
    def last_seq(self) -> int:
        return max((f.last[0] for f in self.files if f.last), default=0)

    def hash_at(self, seq: int) -> str | None:
        for f in self.files:
            if seq in f.hashes:
                return f.hashes[seq]
        return None


def verify_set(paths: Sequence[str], anchors: Sequence[Anchor]) -> VerifyReport:
    """Check each file's chain, how the files link, and that the set holds every anchored head."""
    keep = frozenset(a.seq for a in anchors)
    files: list[_File] = []
    total = 0
    for path in sorted(set(paths)):
        walker = Walker(None, 0, file_start=True)
        found: dict[int, str] = {}
        try:
            with open_regular(path) as handle:
                bad = walk(walker, bounded_lines(handle, MAX_REGION + 1), keep, found)
        except OSError as exc:
            return VerifyReport(False, total, None, f"cannot read: {exc.strerror}", path)
        total += walker.records
        if bad is not None:
            return VerifyReport(False, total, bad[0], bad[1], path)
        last = (walker.seq, walker.prev) if walker.first and walker.prev else None
        files.append(_File(path, walker.records, walker.first, last, found))
    if not anchors:
        note = "no anchor given: a missing tail or a missing file cannot be seen"
        return VerifyReport(
            True, total, None, None, files[-1].path if files else None, notes=(note,)
        )
    return _anchored(files, total, anchors)


def _groups(files: list[_File]) -> list[_Group]:
    by_last = {(f.last[0], f.last[1]): f for f in files if f.last}
    for f in files:
        if f.first is None or f.first[1] == GENESIS:
            continue
        before = by_last.get((f.first[0] - 1, f.first[1]))
        if before is not None and before is not f and before.next is None:
            before.next, f.linked = f, True
    groups = []
    for f in files:
        if f.linked or f.first is None:
            continue
        group, cur = _Group(), f  # type: _Group, _File | None
        while cur is not None and cur not in group.files:
            group.files.append(cur)
            cur = cur.next
        groups.append(group)
    return groups


def _anchored(files: list[_File], total: int, anchors: Sequence[Anchor]) -> VerifyReport:
    groups = _groups(files)
    owner: dict[tuple[int, str], _Group] = {}
    for g in groups:
        for f in g.files:
            if f.first is not None:
                owner[(f.first[0], f.first[2])] = g
    chains: dict[str, list[Anchor]] = {}
    for a in anchors:
        chains.setdefault(a.chain, []).append(a)
    notes: list[str] = []
    claimed: set[int] = set()
    head_seq = None
    for chain, mine in sorted(chains.items()):
        mine.sort(key=lambda a: (a.seq, a.time))
        latest = mine[-1]
        head_seq = latest.seq if head_seq is None else max(head_seq, latest.seq)
        found: dict[int, _Group] = {}
        for a in mine:
            hit = owner.get((a.first_seq, a.first_hash))
            if hit is not None:
                found[id(hit)] = hit
        stretch = sorted(found.values(), key=lambda g: g.first_seq)
        claimed.update(found)
        if len(stretch) > 1:
            early, late = stretch[0], stretch[1]
            return _bad(
                total,
                f"chain {chain}: records seq {early.last_seq + 1} to {late.first_seq - 1} are "
                "missing "
                "(a file of the set is missing)",
                mine,
                latest.seq,
            )
        start = stretch[0].first_seq if stretch else None
        for a in mine:
            required = (
                a is latest or a.kind == "truncated" or (start is not None and a.seq >= start)
            )
            if not required:
                continue
            group = owner.get((a.first_seq, a.first_hash))
            if group is None and stretch:
                group = stretch[0]
            got = group.hash_at(a.seq) if group is not None else None
            if got == a.head:
                continue
            return _bad(total, _missing(chain, a, group, got), mine, latest.seq)
    for g in groups:
        if id(g) not in claimed:
            notes.append(f"{g.files[0].path}: no anchor names this file's chain")
    path = files[-1].path if files else None
    return VerifyReport(True, total, None, None, path, len(anchors), head_seq, tuple(notes))


def _missing(chain: str, a: Anchor, group: _Group | None, got: str | None) -> str:
    when = f"chain {chain}: the anchor of {a.ts} ({a.kind}) names record seq {a.seq}"
    if a.kind == "truncated":
        return (
            f"{when}, but signerd found records cut from its file there (copytruncate, or lost "
            f"while it was stopped) and seq {a.first_seq} to {a.seq} are not in the set"
        )
    if group is None:
        return f"{when}, but no file of the set holds this chain (emptied, rewritten or missing)"
    if got is None and a.seq > group.last_seq:
        return (
            f"{when}, but the set ends at seq {group.last_seq}: the tail is missing "
            "(records removed, or the newest file is not in the set)"
        )
    if got is None:
        return f"{when}, which is not in the set"
    return f"{when}, and that record differs: the trail was edited or rewritten"


def _bad(total: int, problem: str, mine: list[Anchor], head: int) -> VerifyReport:
    return VerifyReport(False, total, None, problem, None, len(mine), head)


def audit_files(args: Sequence[str]) -> list[str]:
    """Files named, the audit files in directories named (``*.jsonl*``, not ``*.anchor``),
    and what globs match; FileNotFoundError when one cannot be read or none is found."""
    found: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            for name in sorted(os.listdir(arg)):
                full = os.path.join(arg, name)
                if ".jsonl" in name and not name.endswith(".anchor") and os.path.isfile(full):
                    found.append(full)
        elif not os.path.exists(arg) and any(c in arg for c in "*?["):
            found.extend(p for p in sorted(glob.glob(arg)) if not p.endswith(".anchor"))
        else:
            found.append(arg)
    for path in found:
        if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            raise NotRegularFile(path)  # a device or FIFO: never read
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise FileNotFoundError(errno.ENOENT, "not a readable file", path)
    if not found:
        raise FileNotFoundError(errno.ENOENT, "no audit file there", " ".join(args))
    return list(dict.fromkeys(found))


def find_anchors(args: Sequence[str], given: Sequence[str]) -> tuple[list[Anchor], list[str]]:
    """The anchors to check against: those ``given``, else FILE.anchor and DIR/*.anchor; and
    notes on lines that are not anchors. OSError names a file that cannot be read."""
    paths = list(given)
    if not paths:
        for arg in args:
            if os.path.isdir(arg):
                paths += sorted(glob.glob(os.path.join(glob.escape(arg), "*.anchor")))
            elif os.path.isfile(arg + ".anchor"):
                paths.append(arg + ".anchor")
    anchors: list[Anchor] = []
    notes: list[str] = []
    for path in dict.fromkeys(paths):
        got, bad = read_anchors(path)
        anchors += got
        notes += [f"{path} line {n}: not an anchor" for n in bad[:5]]
    return anchors, notes
