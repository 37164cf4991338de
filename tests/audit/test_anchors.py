"""Anchors against a real multi-worker daemon: an anchor file or a trail file that goes away
is a security event and fails verification; a rotation (rename + SIGHUP) is none. And the
anchor lines that say so are read strictly."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from signerd.audit import GENESIS, Anchor, Lost, parse_anchor, read_anchors
from signerd.cli import main
from signerd.client import Client

from ..conftest import DaemonProcess, start_daemon, unique, wait_until

pytestmark = pytest.mark.timeout(180)

WORKERS = {"workers": 2}


def verify(*argv: str) -> tuple[int, str]:
    """signerctl audit verify in-process: exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--socket", "/nonexistent/s.sock", "audit", "verify", *argv])
    return code, out.getvalue()


def workers_daemon(base: Path, interval: float = 0.2) -> DaemonProcess:
    return start_daemon(base, server=WORKERS, audit={"anchor_interval": interval})


def trail(d: DaemonProcess, worker: int) -> Path:
    return d.audit_path.parent / f"audit.w{worker}.jsonl"


def anchor_file(d: DaemonProcess, worker: int) -> Path:
    return Path(f"{trail(d, worker)}.anchor")


def all_anchors(d: DaemonProcess) -> list[Anchor]:
    found: list[Anchor] = []
    for path in sorted(d.audit_path.parent.glob("*.anchor*")):
        found += read_anchors(str(path))[0]
    return found


def head_anchored(d: DaemonProcess, worker: int) -> bool:
    """Whether the worker's last anchor names the last record of its live file."""
    path, anchors = trail(d, worker), anchor_file(d, worker)
    if not path.exists() or not anchors.exists():
        return False
    line = path.read_bytes().splitlines()[-1]
    got = read_anchors(str(anchors))[0]
    want = (json.loads(line)["seq"], hashlib.sha256(line).hexdigest())
    return bool(got) and (got[-1].seq, got[-1].head) == want


def records(path: Path) -> int:
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def sign_in_every_worker(d: DaemonProcess, key: str) -> None:
    """Sign over fresh connections until every worker's live file holds a new record."""
    before = [records(trail(d, w)) for w in (0, 1)]

    def one(i: int) -> None:
        with Client(d.socket_path, timeout=30.0) as c:
            c.sign(key, b"data %d" % i)

    deadline = time.monotonic() + 30
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while any(records(trail(d, w)) <= before[w] for w in (0, 1)):
            assert time.monotonic() < deadline, "a worker got no request"
            list(pool.map(one, range(16)))


def new_key(d: DaemonProcess) -> str:
    key = f"{unique('an')}/k"
    with Client(d.socket_path, timeout=30.0) as c:
        c.create_key(key)
    return key


def test_every_worker_anchors_its_start_naming_every_chain(tmp_path: Path) -> None:
    """Each worker anchors its chain at start (seq 0, before any request), and every anchor
    names the run and all the run's chains."""
    d = workers_daemon(tmp_path / "d", interval=3600)
    try:
        wait_until(lambda: anchor_file(d, 0).exists() and anchor_file(d, 1).exists(), 10, "anchors")
        got = all_anchors(d)
        assert sorted((a.chain, a.kind, a.seq) for a in got) == [
            ("audit.w0.jsonl", "start", 0),
            ("audit.w1.jsonl", "start", 0),
        ]
        assert {a.chains for a in got} == {("audit.w0.jsonl", "audit.w1.jsonl")}
        assert len({a.run for a in got}) == 1 and len({a.boot for a in got}) == 2
    finally:
        assert d.stop() == 0, d.log_text()
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_OK, out
    code, out = verify(str(trail(d, 0)))  # one worker's file alone: its anchors name both
    assert code == os.EX_DATAERR and "chain audit.w1.jsonl: signerd's anchors of the run" in out


def test_anchor_file_removed_live_is_critical_and_fails_verify(tmp_path: Path) -> None:
    """rm of a worker's anchor file on the live daemon: a CRITICAL log line without any request,
    a new file that starts with a 'recreated' anchor naming the lost one, signing goes on, and
    verify fails until the lost anchors are given back."""
    d = workers_daemon(tmp_path / "d")
    saved = tmp_path / "saved.anchor"
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        lost = anchor_file(d, 0)
        wait_until(lambda: head_anchored(d, 0), 10, "the head anchored")
        shutil.copyfile(lost, saved)  # what an off-host copy would hold
        lost.unlink()
        wait_until(lambda: "signerd.audit_anchor_lost" in d.log_text(), 10, "the critical line")
        line = next(x for x in d.log_text().splitlines() if "signerd.audit_anchor_lost" in x)
        assert "level=critical" in line and "reason=deleted" in line and "audit.w0.jsonl" in line
        sign_in_every_worker(d, key)
    finally:
        assert d.stop() == 0, d.log_text()
    first, *rest = read_anchors(str(lost))[0]
    assert first.kind == "recreated" and first.lost is not None
    assert first.lost.reason == "deleted" and first.lost.anchors >= 2
    last_saved = read_anchors(str(saved))[0][-1]
    assert first.lost.last is not None
    assert (first.lost.last.seq, first.lost.last.head) == (last_saved.seq, last_saved.head)
    assert rest and rest[-1].kind == "shutdown"
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR, out
    assert "chain audit.w0.jsonl: its anchor file was deleted while signerd ran" in out
    given = [f"--anchor={p}" for p in (saved, lost, anchor_file(d, 1))]
    code, out = verify(*given, str(d.audit_path.parent))
    assert code == os.EX_OK, out


def test_anchor_file_replaced_or_cut_live_is_critical(tmp_path: Path) -> None:
    """An anchor file replaced by another (mv over it) or cut shorter in place is CRITICAL too,
    and verify fails; one renamed away (rotation) is followed quietly and verifies."""
    d = workers_daemon(tmp_path / "d")
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        a0, a1 = anchor_file(d, 0), anchor_file(d, 1)
        wait_until(lambda: all(len(read_anchors(str(a))[0]) >= 2 for a in (a0, a1)), 10, "anchors")
        forged = tmp_path / "forged.anchor"
        forged.write_bytes(b"")
        forged.rename(a0)  # mv over it: the file signerd held has no name left
        wait_until(lambda: "reason=replaced" in d.log_text(), 10, "replaced")
        os.truncate(a1, 0)
        wait_until(lambda: "reason=truncated" in d.log_text(), 10, "truncated")
        sign_in_every_worker(d, key)
    finally:
        assert d.stop() == 0, d.log_text()
    lines = [x for x in d.log_text().splitlines() if "signerd.audit_anchor_lost" in x]
    assert len(lines) == 2 and all("level=critical" in x for x in lines), lines
    for a in (a0, a1):
        assert read_anchors(str(a))[0][0].kind == "recreated"
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR and "its anchor file was" in out, out

    d = workers_daemon(tmp_path / "e")
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        for w in (0, 1):
            anchor_file(d, w).rename(f"{anchor_file(d, w)}.1")
        d.sighup()
        wait_until(lambda: all(anchor_file(d, w).exists() for w in (0, 1)), 10, "new files")
        sign_in_every_worker(d, key)
    finally:
        assert d.stop() == 0, d.log_text()
    assert "signerd.audit_anchor_lost" not in d.log_text()
    assert d.log_text().count("signerd.audit_anchor_rotated") == 2
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_OK, out
    only_new = [f"--anchor={anchor_file(d, w)}" for w in (0, 1)]
    code, out = verify(*only_new, str(d.audit_path.parent))
    assert code == os.EX_OK, out


def test_trail_and_anchor_deleted_together_fail_offline(tmp_path: Path) -> None:
    """A worker's trail file and its anchor file deleted together (daemon stopped): verify fails,
    as the other worker's anchors name the vanished chain; and still after a restart."""
    d = workers_daemon(tmp_path / "d")
    try:
        sign_in_every_worker(d, new_key(d))
    finally:
        assert d.stop() == 0, d.log_text()
    assert verify(str(d.audit_path.parent))[0] == os.EX_OK
    trail(d, 1).unlink()
    anchor_file(d, 1).unlink()
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR, out
    assert "chain audit.w1.jsonl: signerd's anchors of the run started" in out
    assert "its anchor file is missing" in out
    d = start_daemon(d.dir, server=WORKERS, audit={"anchor_interval": 0.2})
    try:
        sign_in_every_worker(d, new_key(d))
    finally:
        assert d.stop() == 0, d.log_text()
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR and "chain audit.w1.jsonl: signerd's anchors of the run" in out


def test_anchor_file_missing_at_start_is_critical(tmp_path: Path) -> None:
    """An anchor file deleted while signerd was stopped, its trail kept: CRITICAL at start, a
    'recreated' anchor (reason missing), and verify fails unless the old anchors are given."""
    d = workers_daemon(tmp_path / "d")
    try:
        sign_in_every_worker(d, new_key(d))
    finally:
        assert d.stop() == 0, d.log_text()
    saved = tmp_path / "saved.anchor"
    anchor_file(d, 0).rename(saved)
    d = start_daemon(d.dir, server=WORKERS, audit={"anchor_interval": 0.2})
    try:
        wait_until(lambda: "signerd.audit_anchor_lost" in d.log_text(), 10, "the critical line")
    finally:
        assert d.stop() == 0, d.log_text()
    line = next(x for x in d.log_text().splitlines() if "signerd.audit_anchor_lost" in x)
    assert "level=critical" in line and "reason=missing" in line and "audit.w0.jsonl" in line
    first = read_anchors(str(anchor_file(d, 0)))[0][0]
    assert first.kind == "recreated" and first.lost is not None and first.lost.reason == "missing"
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR and "was missing when signerd started" in out, out
    given = [f"--anchor={p}" for p in (saved, anchor_file(d, 0), anchor_file(d, 1))]
    code, out = verify(*given, str(d.audit_path.parent))
    assert code == os.EX_OK, out


def test_deleted_trail_then_sighup_is_never_a_rotation(tmp_path: Path) -> None:
    """A worker's live trail file deleted, then SIGHUP, eight times over (either worker, the
    SIGHUP before or after the next request): each time a CRITICAL audit_deleted and a
    'deleted' anchor, never a 'rotated' one; verify fails. A SIGHUP alone anchors nothing."""
    d = workers_daemon(tmp_path / "d")
    trials = 8
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        d.sighup()  # no file renamed: no 'rotated' anchor
        time.sleep(0.5)
        sign_in_every_worker(d, key)
        for n in range(trials):
            trail(d, n % 2).unlink()
            if n % 4 < 2:
                d.sighup()
                sign_in_every_worker(d, key)
            else:
                sign_in_every_worker(d, key)
                d.sighup()

            def logged(n: int = n) -> bool:
                return d.log_text().count("signerd.audit_deleted") == n + 1

            wait_until(logged, 10, f"deletion {n + 1} logged")
    finally:
        assert d.stop() == 0, d.log_text()
    lines = [x for x in d.log_text().splitlines() if "signerd.audit_deleted" in x]
    assert len(lines) == trials and all("level=critical" in x for x in lines)
    kinds = [a.kind for a in all_anchors(d)]
    assert kinds.count("deleted") == trials and "rotated" not in kinds, kinds
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR and "found its file deleted while it ran" in out, out


def test_trail_replaced_live_is_a_deletion_noticed_without_requests(tmp_path: Path) -> None:
    """Another file moved over a worker's live trail file is a deletion, not a rotation: logged
    CRITICAL on the anchor tick with no request or SIGHUP, anchored 'deleted'; verify fails."""
    d = workers_daemon(tmp_path / "d")
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        other = tmp_path / "other.jsonl"
        other.write_bytes(b"")
        os.replace(other, trail(d, 1))
        wait_until(lambda: "signerd.audit_deleted" in d.log_text(), 10, "the critical line")
        line = next(x for x in d.log_text().splitlines() if "signerd.audit_deleted" in x)
        assert "level=critical" in line and "audit.w1.jsonl" in line
        sign_in_every_worker(d, key)
    finally:
        assert d.stop() == 0, d.log_text()
    kinds = [a.kind for a in read_anchors(str(anchor_file(d, 1)))[0]]
    assert "deleted" in kinds and "rotated" not in kinds, kinds
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_DATAERR and "found its file deleted while it ran" in out, out


def test_rename_and_sighup_rotation_verifies_across_workers(tmp_path: Path) -> None:
    """Both workers' files renamed then SIGHUP, twice: each old file's head is anchored, no
    security event is logged, and the directory verifies as one set (so does the set without
    the oldest rotation, as retention would leave it)."""
    d = workers_daemon(tmp_path / "d")
    try:
        key = new_key(d)
        sign_in_every_worker(d, key)
        for n in (1, 2):
            for w in (0, 1):
                if n == 2:
                    Path(f"{trail(d, w)}.1").rename(f"{trail(d, w)}.2")
                trail(d, w).rename(f"{trail(d, w)}.1")
            d.sighup()
            sign_in_every_worker(d, key)
    finally:
        assert d.stop() == 0, d.log_text()
    assert "level=critical" not in d.log_text()
    got = all_anchors(d)
    assert not {a.kind for a in got} & {"deleted", "truncated", "recreated"}, got
    named = {(a.chain, a.seq, a.head) for a in got}
    for w in (0, 1):
        for old in (Path(f"{trail(d, w)}.1"), Path(f"{trail(d, w)}.2")):
            line = old.read_bytes().splitlines()[-1]  # each old file's head was anchored
            head = (trail(d, w).name, json.loads(line)["seq"], hashlib.sha256(line).hexdigest())
            assert head in named, (old, head)
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_OK, out
    for w in (0, 1):
        Path(f"{trail(d, w)}.2").unlink()
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_OK, out
    first = json.loads(Path(f"{trail(d, 0)}.1").read_bytes().splitlines()[0])
    assert first["rotated_from"] == first["prev"]


GOOD = Anchor("audit.w0.jsonl", "schedule", 1795000000.5, 3, "ab" * 32, 1, "cd" * 32, "b00t",
              run="0123abcd", chains=("audit.w0.jsonl", "audit.w1.jsonl"))  # fmt: skip


@pytest.mark.parametrize(
    "change",
    [
        {"chains": "audit.w0.jsonl"},
        {"chains": ["audit.w0.jsonl", 7]},
        {"chains": ["../etc/passwd"]},
        {"chains": [""]},
        {"chains": ["x"] * 1025},
        {"run": "not hex"},
        {"seq": -1},
        {"lost": {"reason": "deleted", "anchors": 1, "last": None}},  # lost on a schedule
        {"anchor": "recreated"},  # recreated without lost
        {"anchor": "recreated", "lost": {"reason": "eaten", "anchors": 1, "last": None}},
        {"anchor": "recreated", "lost": {"reason": "deleted", "anchors": -2, "last": None}},
        {"anchor": "recreated", "lost": {"reason": "deleted", "anchors": 1, "last": {"seq": 1}}},
    ],
)
def test_malformed_anchor_lines_are_not_anchors(change: dict[str, object]) -> None:
    """An anchor line whose run, chains, seq or lost member is malformed is no anchor at all."""
    record = json.loads(GOOD.line())
    assert parse_anchor(GOOD.line()) == GOOD
    record.update(change)
    assert parse_anchor(json.dumps(record).encode()) is None


def test_recreated_anchor_line_round_trips() -> None:
    """A recreated anchor's lost member (reason, count, last anchor) reads back as written."""
    last = Anchor("", "", 1795000000.25, 2, "ef" * 32, 0, GENESIS)
    made = Anchor(
        GOOD.chain, "recreated", 1795000001.0, 3, GOOD.head, 1, GOOD.first_hash, "b00t",
        run=GOOD.run, chains=GOOD.chains, lost=Lost("replaced", 4, last),
    )  # fmt: skip
    got = parse_anchor(made.line())
    assert got is not None and got.lost == made.lost and got.chains == made.chains
