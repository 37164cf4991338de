"""Checking audit files: one chain alone, or a set against the anchors: is anything missing?

``verify_trail`` is ``signerctl audit verify``: it finds the files and their
anchors and checks them. ``verify_files`` checks files of one chain alone
(oldest first), by their links only.

The files may come in any order and hold one or several chains (rotated files
of one chain, one chain per worker). Each file's chain is checked on its own;
files are linked by hash (a file's first record's ``prev`` is its
predecessor's last record); anchors name their chain and the first record of
the file their head was in, and each names its daemon run and every chain of
that run. Then:

- every chain an anchor names must be in the set, in one unbroken stretch (a
  missing middle file is a gap);
- the latest anchor of each chain, every anchor within the stretch, and every
  ``truncated``, ``deleted`` and ``recreated`` anchor must find its record in
  the set, at its seq, with its hash: a removed, edited or rewritten tail, an
  emptied file, a missing newest file, the records a live truncation threw
  away or a file deleted under signerd are reported;
- a ``recreated`` anchor (the anchor file was deleted, replaced or cut while
  signerd ran, or found missing at start) needs the anchors the lost file held
  in the set: the last one it names, or any earlier one when that is unknown;
- every chain that a run's anchors name needs an anchor of that run in the set
  (a worker's trail and anchor file deleted together);
- with anchors given, every file's chain must be named by one (an anchor at
  seq 0, written when a chain starts, stands for its first records until the
  next anchor);
- files before the stretch may be missing (retention deletes the oldest).
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._files import NotRegularFile, bounded_lines, open_regular
from ._anchor import SECURITY_KINDS, Anchor, read_anchors
from ._chain import GENESIS, MAX_REGION, VerifyReport, Walker, walk
from ._intents import unfinished

__all__ = [
    "audit_files",
    "find_anchors",
    "verify_file",
    "verify_files",
    "verify_set",
    "verify_trail",
]


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


def verify_file(path: str) -> VerifyReport:
    """Check one audit file's chain; say where it first breaks."""
    return verify_files([path])


def verify_files(paths: Sequence[str]) -> VerifyReport:
    """Check audit files that follow each other (oldest first), and the links between them."""
    total = 0
    walker: Walker | None = None
    for path in paths:
        if walker is None:
            walker = Walker(None, 0, file_start=True)
        else:  # the next file continues the chain, starting with a rotated_from record
            walker = Walker(walker.prev, walker.seq, file_start=True)
        try:
            with open_regular(path) as handle:
                bad = walk(walker, bounded_lines(handle, MAX_REGION + 1))
        except OSError as exc:
            return VerifyReport(False, total, None, f"cannot read: {exc.strerror}", path)
        total += walker.records
        if bad is not None:
            return VerifyReport(False, total, bad[0], bad[1], path)
    return VerifyReport(True, total, None, None, paths[-1] if paths else None)


def verify_trail(
    paths: Sequence[str], anchors: Sequence[str] = (), *, use_anchors: bool = True
) -> tuple[VerifyReport, int]:
    """Check the audit files ``paths`` name (files, directories, globs: ``audit_files``)
    against the anchors (the files ``anchors`` names, else those beside the trail:
    ``find_anchors``; none without ``use_anchors``). The report, with a note per line of
    an anchor file that is not an anchor, and how many audit files were checked.
    OSError names a file that cannot be read (NotRegularFile: a device or FIFO)."""
    # the anchors before the trail: each one names a head already written
    found, notes = find_anchors(paths, anchors) if use_anchors else ([], [])
    files = audit_files(paths)
    if len(files) == 1 and not found and not anchors:
        report = verify_file(files[0])  # one file, nothing to check it against
    else:
        report = verify_set(files, found)
    notes += unfinished(files) if report.ok else []  # intents whose outcome never came
    return dataclasses.replace(report, notes=report.notes + tuple(notes)), len(files)


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
    claimed: set[int] = set()
    unborn: list[str] = []  # chains anchored only before their first record
    head_seq = None
    for chain, mine in sorted(chains.items()):
        mine.sort(key=lambda a: (a.seq, a.time))
        lost = _lost_anchors(chain, mine)
        if lost is not None:
            return _bad(total, lost, mine, mine[-1].seq)
        real = [a for a in mine if a.seq > 0]  # seq 0: the chain had no record yet
        if not real:
            unborn.append(chain)
            continue
        latest = real[-1]
        head_seq = latest.seq if head_seq is None else max(head_seq, latest.seq)
        found: dict[int, _Group] = {}
        for a in real:
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
        for a in real:
            required = (
                a is latest or a.kind in SECURITY_KINDS or (start is not None and a.seq >= start)
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
    vanished = _vanished(anchors)
    if vanished is not None:
        return _bad(total, vanished, list(anchors), head_seq or 0)
    for g in groups:
        if id(g) in claimed:
            continue
        if unborn and g.files[0].first is not None and g.files[0].first[1] == GENESIS:
            # records written after a start anchor at seq 0 and before any other anchor
            unborn.remove(_likely(unborn, g))
            continue
        return VerifyReport(
            False,
            total,
            None,
            "no anchor names this file's chain, while other chains are anchored: its anchor "
            "file is missing from the set (or the file is not signerd's)",
            g.files[0].path,
            len(anchors),
            head_seq,
        )
    path = files[-1].path if files else None
    return VerifyReport(True, total, None, None, path, len(anchors), head_seq)


def _likely(chains: list[str], group: _Group) -> str:
    """The chain (of several) a group of files most likely belongs to, by the files' names."""
    names = {os.path.basename(f.path) for f in group.files}
    for chain in chains:
        if any(n == chain or n.startswith(chain + ".") for n in names):
            return chain
    return chains[0]


def _lost_anchors(chain: str, mine: list[Anchor]) -> str | None:
    """A ``recreated`` anchor whose lost anchor file is not in the set, described."""
    for r in mine:
        if r.lost is None or r.lost.anchors == 0:
            continue
        last = r.lost.last
        if last is not None:
            want = (last.seq, last.head, last.time)
            if any((a.seq, a.head, a.time) == want for a in mine if a is not r):
                continue
            held = (
                f"the anchors it held (at least {r.lost.anchors}, the last at seq {last.seq}, "
                f"{last.ts})"
            )
        else:
            if any(a.time < r.time for a in mine if a is not r):
                continue
            held = "the anchors it held"
        how = (
            "was missing when signerd started (with records in the trail)"
            if r.lost.reason == "missing"
            else f"was {r.lost.reason} while signerd ran (noticed {r.ts})"
        )
        return (
            f"chain {chain}: its anchor file {how}; {held} are not in the set: give that "
            "file or an off-host copy of it with --anchor"
        )
    return None


def _vanished(anchors: Sequence[Anchor]) -> str | None:
    """A chain that its run's anchors name but that has no anchor of that run in the set."""
    named: dict[str, set[str]] = {}
    present: dict[str, set[str]] = {}
    began: dict[str, Anchor] = {}
    for a in anchors:
        if not a.run:
            continue  # written before anchors named their run
        named.setdefault(a.run, set()).update(a.chains)
        present.setdefault(a.run, set()).add(a.chain)
        if a.run not in began or a.time < began[a.run].time:
            began[a.run] = a
    for run in sorted(named, key=lambda r: began[r].time):
        missing = sorted(named[run] - present[run])
        if missing:
            return (
                f"chain {missing[0]}: signerd's anchors of the run started {began[run].ts} name "
                "it as one of that run's chains, but none of its anchors from that run is in "
                "the set: its anchor file is missing (and maybe its trail files)"
            )
    return None


def _missing(chain: str, a: Anchor, group: _Group | None, got: str | None) -> str:
    when = f"chain {chain}: the anchor of {a.ts} ({a.kind}) names record seq {a.seq}"
    if a.kind == "truncated":
        return (
            f"{when}, but signerd found records cut from its file there (copytruncate, or lost "
            f"while it was stopped) and seq {a.first_seq} to {a.seq} are not in the set"
        )
    if a.kind == "deleted":
        return (
            f"{when}, but signerd found its file deleted while it ran (not renamed) and seq "
            f"{a.first_seq} to {a.seq} are not in the set"
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


def _is_anchor(path: str) -> bool:
    """An anchor file's name: ``NAME.anchor``, or rotated, ``NAME.anchor.N``."""
    return re.fullmatch(r".+\.anchor(\.[0-9]+)?", os.path.basename(path)) is not None


def audit_files(args: Sequence[str]) -> list[str]:
    """Files named, the audit files in directories named (``*.jsonl*``, not anchor files),
    and what globs match; FileNotFoundError when one cannot be read or none is found,
    NotRegularFile for a device or FIFO."""
    found: list[str] = []
    for arg in args:
        if os.path.isdir(arg):
            for name in sorted(os.listdir(arg)):
                full = os.path.join(arg, name)
                if ".jsonl" in name and not _is_anchor(name) and os.path.isfile(full):
                    found.append(full)
        elif not os.path.exists(arg) and any(c in arg for c in "*?["):
            found.extend(p for p in sorted(glob.glob(arg)) if not _is_anchor(p))
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
    """The anchors to check against: those ``given``, else FILE.anchor and the anchor files
    in DIR (``*.anchor`` and rotated ``*.anchor.N``); and notes on lines that are not
    anchors. OSError names a file that cannot be read (NotRegularFile: a device or FIFO)."""
    paths = list(given)
    if not paths:
        for arg in args:
            if os.path.isdir(arg):
                pattern = os.path.join(glob.escape(arg), "*.anchor*")
                paths += [p for p in sorted(glob.glob(pattern)) if _is_anchor(p)]
            elif os.path.isfile(arg + ".anchor"):
                paths.append(arg + ".anchor")
    anchors: list[Anchor] = []
    notes: list[str] = []
    for path in dict.fromkeys(paths):
        got, bad = read_anchors(path)
        anchors += got
        notes += [f"{path} line {n}: not an anchor" for n in bad[:5]]
    return anchors, notes
