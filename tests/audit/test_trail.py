"""The audit trail: hash chain, fail-closed writes on real faulty sinks, rotation, tamper detection."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import hmac
import itertools
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.audit import (
    GENESIS,
    AuditEvent,
    AuditTrail,
    audit_from_config,
    verify_file,
    verify_files,
)
from signerd.audit._chain import encode_record as _encode
from signerd.authz import Peer
from signerd.errors import AuditUnavailable

pytestmark = pytest.mark.timeout(60)

PEER = Peer(pid=4242, uid=1001, gid=1001, unit="gateway.service", user="gateway", groups=(50,))
F_SETPIPE_SZ = 1031


def event(i: int = 0, request_id: str | None = None, **fields: Any) -> AuditEvent:
    base: dict[str, Any] = {
        "time": 1795000000.5,
        "request_id": request_id or f"req-{i}",
        "peer": PEER,
        "operation": "sign",
        "outcome": "ok",
        "tenant": "acme",
        "key": "acme/feedback",
        "kid": "acme.feedback.v1",
        "payload_sha256": (hashlib.sha256(b"payload %d" % i).hexdigest(),),
    }
    base.update(fields)
    return AuditEvent(**base)


def records(path: Path) -> list[dict[str, Any]]:
    """The lines of the file that are whole records (torn bytes skipped)."""
    found = []
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(ValueError):
            found.append(json.loads(line))
    return found


async def fails_fast(trail: AuditTrail, ev: AuditEvent, within: float = 1.0) -> float:
    started = time.monotonic()
    with pytest.raises(AuditUnavailable):
        await trail.record(ev)
    took = time.monotonic() - started
    assert took < within, f"AuditUnavailable after {took:.3f}s"
    return took


async def until_written(trail: AuditTrail, ev: AuditEvent, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            await trail.record(ev)
            return
        except AuditUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


# --- format and chain ---------------------------------------------------------


async def test_records_chain_from_genesis_and_verify(tmp_path: Path) -> None:
    """Each record carries seq and the SHA-256 of the previous line; the first chains from zeros."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    for i in range(5):
        await trail.record(event(i))
    await trail.aclose()
    lines = path.read_bytes().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["seq"] for r in recs] == [1, 2, 3, 4, 5]
    assert recs[0]["prev"] == GENESIS
    for before, rec in zip(lines, recs[1:], strict=False):
        assert rec["prev"] == hashlib.sha256(before).hexdigest()
    assert verify_file(str(path)).ok
    assert verify_file(str(path)).records == 5


async def test_missing_directory_is_created(tmp_path: Path) -> None:
    """The audit file's directory is created (0750) when it does not exist yet."""
    path = tmp_path / "log" / "signerd" / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(event(0))
    await trail.aclose()
    assert (path.parent.stat().st_mode & 0o777) == 0o750
    assert verify_file(str(path)).ok


async def test_record_holds_only_event_fields(tmp_path: Path) -> None:
    """A record has exactly the event's fields (peer, op, tenant, key, kid, payload hash, outcome)."""
    path = tmp_path / "audit.jsonl"
    key = bytes(range(32))
    trail = AuditTrail(str(path), hmac_key=key)
    ev = event(7, outcome="permission_denied", status=403, reason="caller may not sign")
    await trail.record(ev)
    await trail.aclose()
    (rec,) = records(path)
    assert set(rec) == {
        "v", "seq", "record_id", "prev", "time", "request_id", "peer", "operation",
        "tenant", "key", "kid", "payload_hmac", "outcome", "status", "reason",
        "security",  # permission_denied is a security event (signerd/_calls.py)
    }  # fmt: skip
    assert rec["security"] is True
    assert rec["peer"] == {
        "pid": 4242, "uid": 1001, "gid": 1001, "groups": [50], "user": "gateway",
        "unit": "gateway.service",
    }  # fmt: skip
    digest = bytes.fromhex(ev.payload_sha256[0])
    assert rec["payload_hmac"] == [hmac.new(key, digest, hashlib.sha256).hexdigest()]
    assert rec["record_id"] == f"{trail.boot}-1" and rec["v"] == 2
    assert (rec["outcome"], rec["status"], rec["reason"]) == (
        "permission_denied",
        403,
        "caller may not sign",
    )
    assert rec["time"] == 1795000000  # Unix seconds, an integer (the event had .5)
    assert path.read_bytes().count(b"\n") == 1


async def test_newlines_in_fields_stay_one_line(tmp_path: Path) -> None:
    """A field containing newlines cannot split a record or forge a second one."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    forged = '\n{"seq":2,"prev":"' + GENESIS + '"}\n'
    await trail.record(event(1, reason=forged, request_id="x\ny"))
    await trail.record(event(2))
    await trail.aclose()
    assert len(path.read_bytes().splitlines()) == 2
    assert records(path)[0]["reason"] == forged
    assert verify_file(str(path)).ok


async def test_concurrent_records_form_one_chain(tmp_path: Path) -> None:
    """Hundreds of concurrent records are batched into one unbroken chain with unique seqs."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await asyncio.gather(*(trail.record(event(i)) for i in range(500)))
    await trail.aclose()
    recs = records(path)
    assert sorted(r["seq"] for r in recs) == list(range(1, 501))
    assert {r["request_id"] for r in recs} == {f"req-{i}" for i in range(500)}
    assert verify_file(str(path)) == verify_file(str(path))
    report = verify_file(str(path))
    assert report.ok and report.records == 500


async def test_restart_continues_the_chain(tmp_path: Path) -> None:
    """A new trail on an existing file continues its chain instead of starting over."""
    path = tmp_path / "audit.jsonl"
    for round_ in range(3):
        trail = AuditTrail(str(path))
        for i in range(3):
            await trail.record(event(round_ * 10 + i))
        await trail.aclose()
    recs = records(path)
    assert [r["seq"] for r in recs] == list(range(1, 10))
    assert [r["prev"] == GENESIS for r in recs].count(True) == 1
    assert verify_file(str(path)).ok


async def test_restart_after_a_torn_write(tmp_path: Path) -> None:
    """Bytes a crash left after the last record are named by the next record, and the file verifies."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    for i in range(3):
        await trail.record(event(i))
    await trail.aclose()
    last = path.read_bytes().splitlines()[-1]
    landed = _encode(event(3), 4, hashlib.sha256(last).hexdigest(), {})
    torn = b'{"key":"acme/feedback","ki'
    with open(path, "ab") as handle:
        handle.write(landed + b"\n" + torn)
    trail = AuditTrail(str(path))
    await trail.record(event(4))
    await trail.aclose()
    recs = records(path)
    assert recs[-1]["seq"] == 5
    assert recs[-1]["prev"] == hashlib.sha256(landed).hexdigest()
    assert recs[-1]["discarded"] == {
        "bytes": len(torn) + 1,
        "sha256": hashlib.sha256(torn + b"\n").hexdigest(),
    }
    assert verify_file(str(path)).ok


# --- fail closed, fast, and recover ---------------------------------------------


async def test_dev_full_refuses_within_a_second(tmp_path: Path) -> None:
    """With /dev/full as the sink every record raises AuditUnavailable well within 1 s."""
    trail = AuditTrail("/dev/full", write_timeout=0.5)
    for i in range(5):
        await fails_fast(trail, event(i))
    await trail.aclose()


async def test_recovers_when_the_sink_works_again(tmp_path: Path) -> None:
    """A sink that fails (a link to /dev/full) works again after the link points to a file."""
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    trail = AuditTrail(str(link), write_timeout=0.5)
    await fails_fast(trail, event(0))
    await fails_fast(trail, event(1))
    real = tmp_path / "real.jsonl"
    link.unlink()
    link.symlink_to(real)
    await trail.record(event(2))
    await trail.record(event(3))
    await trail.aclose()
    assert [r["request_id"] for r in records(real)] == ["req-2", "req-3"]
    assert verify_file(str(real)).ok


async def test_fifo_without_reader_refuses_then_recovers(tmp_path: Path) -> None:
    """A FIFO nobody reads refuses at once (no hang on open); a reader brings the trail back."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    trail = AuditTrail(str(fifo), write_timeout=0.5)
    took = await fails_fast(trail, event(0))
    assert took < 0.2  # not a timeout: the open itself says there is no reader
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        await trail.record(event(1))
        await trail.record(event(2))
        got = os.read(rfd, 65536)
    finally:
        os.close(rfd)
    lines = got.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req-1", "req-2"]
    assert json.loads(lines[1])["prev"] == hashlib.sha256(lines[0]).hexdigest()
    # the reader went away: refused again, quickly
    await fails_fast(trail, event(3))
    await fails_fast(trail, event(4))
    await trail.aclose()


async def test_fifo_whose_reader_stops_reading(tmp_path: Path) -> None:
    """A full pipe refuses records quickly instead of blocking, and draining it recovers."""
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(rfd, F_SETPIPE_SZ, 4096)
        trail = AuditTrail(str(fifo), write_timeout=0.5)
        written = 0
        while True:
            try:
                await trail.record(event(written))
            except AuditUnavailable:
                break
            written += 1
            assert written < 100, "a 4 KiB pipe never filled"
        for i in range(3):
            await fails_fast(trail, event(100 + i), within=0.6)
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(rfd, 65536):
                data += chunk
        await until_written(trail, event(200))
        data += os.read(rfd, 65536)
        await trail.aclose()
    finally:
        os.close(rfd)
    copy = tmp_path / "received.jsonl"
    copy.write_bytes(data)
    report = verify_file(str(copy))
    assert report.ok, report
    assert report.records == written + 1


async def test_unwritable_directory_refuses_then_recovers(tmp_path: Path) -> None:
    """An audit file in an immutable directory refuses within 1 s; writes resume once it is not."""
    directory = tmp_path / "locked"
    directory.mkdir()
    run("chattr", "+i", str(directory))
    try:
        trail = AuditTrail(str(directory / "audit.jsonl"), write_timeout=0.5)
        await fails_fast(trail, event(0))
        await fails_fast(trail, event(1))
    finally:
        run("chattr", "-i", str(directory))
    await trail.record(event(2))
    await trail.aclose()
    assert [r["request_id"] for r in records(directory / "audit.jsonl")] == ["req-2"]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt))
    try:
        yield mnt
    finally:
        for name in os.listdir(mnt):
            subprocess.run(["chattr", "-a", str(mnt / name)], capture_output=True)
        run("umount", str(mnt))


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 64, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


async def test_disk_full_torn_write_is_accounted_for(small_tmpfs: Path) -> None:
    """On a full disk a record torn mid-line refuses, and the next record names the torn bytes.

    The file is append-only (chattr +a): recovery never truncates.
    """
    path = small_tmpfs / "audit.jsonl"
    trail = AuditTrail(str(path), write_timeout=0.5)
    await trail.record(event(0))
    run("chattr", "+a", str(path))
    filler = fill(small_tmpfs)
    seq = 1
    while True:  # write into the last page until a record does not fit; never exactly fill it
        free = -path.stat().st_size % 4096
        ev = event(seq, request_id="r" * 40)
        if len(_encode(ev, seq + 1, GENESIS, {})) + 1 == free:
            ev = event(seq, request_id="r" * 41)
        try:
            await trail.record(ev)
        except AuditUnavailable:
            break
        seq += 1
        assert seq < 100
    torn = path.read_bytes()
    assert not torn.endswith(b"\n"), "expected a torn record at the end of the file"
    await fails_fast(trail, event(500))
    filler.unlink()
    await trail.record(event(501))
    await trail.record(event(502))
    await trail.aclose()
    after = path.read_bytes()
    assert after.startswith(torn)  # nothing was truncated
    recs = records(path)
    marked = [r for r in recs if "discarded" in r]
    assert len(marked) == 1 and marked[0]["request_id"] == "req-501"
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    report = verify_file(str(path))
    assert report.ok, report


@pytest.fixture
def frozen_fs(tmp_path: Path) -> Iterator[tuple[Path, Any]]:
    """A small ext4 file system on a loop device that a test can freeze (writes then block)."""
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(8 << 20)
    run("mkfs.ext4", "-q", "-F", str(image))
    run("mount", "-o", "loop", str(image), str(mnt))

    def freeze(on: bool) -> None:
        subprocess.run(
            ["fsfreeze", "--freeze" if on else "--unfreeze", str(mnt)], capture_output=True
        )

    try:
        yield mnt, freeze
    finally:
        freeze(False)
        for _ in range(50):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


async def test_blocked_sink_refuses_fast_and_recovers(frozen_fs: tuple[Path, Any]) -> None:
    """A write blocked in the kernel refuses after write_timeout, later records at once; then recovers.

    The record that was stuck when the file system froze lands after the thaw; its
    caller was refused, so the next record lists it as unacknowledged.
    """
    mnt, freeze = frozen_fs
    path = mnt / "audit.jsonl"
    trail = AuditTrail(str(path), write_timeout=0.5)
    await trail.record(event(0))
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    freeze(True)
    try:
        first = await fails_fast(trail, event(1))
        assert first >= 0.45  # it waited for its deadline
        for i in range(2, 6):
            assert await fails_fast(trail, event(i)) < 0.05  # the writer is stuck: no waiting
    finally:
        freeze(False)
    await until_written(trail, event(6))
    task.cancel()
    await trail.aclose()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) < 0.2, "the event loop was blocked"
    recs = records(path)
    assert [r["request_id"] for r in recs] == ["req-0", "req-1", "req-6"]
    assert recs[2]["unacknowledged"] == [2]
    assert verify_file(str(path)).ok


# --- rotation ----------------------------------------------------------------------


async def test_reopen_after_rotation_continues_the_chain(tmp_path: Path) -> None:
    """After rename + reopen the next record goes to a new file that chains from the old one."""
    path = tmp_path / "audit.jsonl"
    rotated = tmp_path / "audit.jsonl.1"
    trail = AuditTrail(str(path))
    for i in range(3):
        await trail.record(event(i))
    path.rename(rotated)
    trail.reopen()
    for i in range(3, 5):
        await trail.record(event(i))
    await trail.aclose()
    old, new = records(rotated), records(path)
    assert [r["seq"] for r in old + new] == [1, 2, 3, 4, 5]
    last_old = rotated.read_bytes().splitlines()[-1]
    assert new[0]["prev"] == new[0]["rotated_from"] == hashlib.sha256(last_old).hexdigest()
    assert verify_file(str(rotated)).ok
    assert verify_file(str(path)).ok
    both = verify_files([str(rotated), str(path)])
    assert both.ok and both.records == 5
    swapped = verify_files([str(path), str(rotated)])
    assert not swapped.ok and swapped.path == str(rotated)


async def test_reopen_into_a_file_with_foreign_bytes(tmp_path: Path) -> None:
    """If the new file already holds non-record bytes, the chain moves in and names them."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(event(0))
    path.rename(tmp_path / "old.jsonl")
    path.write_bytes(b"not an audit record\n")
    trail.reopen()
    await trail.record(event(1))
    await trail.aclose()
    (rec,) = records(path)
    assert rec["seq"] == 2 and rec["rotated_from"] == rec["prev"]
    assert rec["discarded"]["bytes"] == len(b"not an audit record\n")
    assert verify_files([str(tmp_path / "old.jsonl"), str(path)]).ok


async def test_renamed_file_without_reopen_is_left_alone(tmp_path: Path) -> None:
    """A file renamed away (no SIGHUP) is noticed before the next write, which goes to a new file."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(event(0))
    path.rename(tmp_path / "moved.jsonl")
    await trail.record(event(1))
    await trail.aclose()
    assert [r["seq"] for r in records(tmp_path / "moved.jsonl")] == [1]
    assert [r["seq"] for r in records(path)] == [2]
    assert verify_files([str(tmp_path / "moved.jsonl"), str(path)]).ok


async def test_never_writes_into_a_deleted_file(tmp_path: Path) -> None:
    """After the file is deleted, records go to a new file at the path, not the deleted inode."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(event(0))
    with open(path, "rb") as old:  # keep the deleted inode to look at it
        path.unlink()
        await trail.record(event(1))
        assert os.fstat(old.fileno()).st_size == len(old.read())
        old.seek(0)
        assert [json.loads(line)["seq"] for line in old.read().splitlines()] == [1]
    await trail.aclose()
    assert [r["seq"] for r in records(path)] == [2]
    assert records(path)[0]["rotated_from"] == records(path)[0]["prev"]


async def test_truncated_file_starts_a_new_chain_segment(tmp_path: Path) -> None:
    """A file truncated under the writer (copytruncate) gets a rotated_from first record."""
    path = tmp_path / "audit.jsonl"
    trail = AuditTrail(str(path))
    await trail.record(event(0))
    await trail.record(event(1))
    os.truncate(path, 0)
    await trail.record(event(2))
    await trail.aclose()
    (rec,) = records(path)
    assert rec["seq"] == 3 and rec["rotated_from"] == rec["prev"]
    assert verify_file(str(path)).ok


# --- tamper detection ---------------------------------------------------------------


@pytest.fixture
async def clean_file(tmp_path: Path) -> Path:
    path = tmp_path / "clean.jsonl"
    trail = AuditTrail(str(path))
    for i in range(6):
        await trail.record(event(i))
    await trail.aclose()
    assert verify_file(str(path)).ok
    return path


def tampered(path: Path, lines: list[bytes]) -> str:
    out = path.with_name("tampered.jsonl")
    out.write_bytes(b"".join(line + b"\n" for line in lines))
    return str(out)


def test_edited_record_is_found(clean_file: Path) -> None:
    """Changing a record (ok -> denied) breaks the link to the next one: reported there."""
    lines = clean_file.read_bytes().splitlines()
    lines[2] = lines[2].replace(b'"outcome":"ok"', b'"outcome":"permission_denied"')
    report = verify_file(tampered(clean_file, lines))
    assert not report.ok
    assert report.first_bad_line == 4
    assert report.problem is not None and "line 3" in report.problem


def test_edited_record_that_breaks_json_is_found(clean_file: Path) -> None:
    """A record edited into invalid JSON is reported on its own line."""
    lines = clean_file.read_bytes().splitlines()
    lines[1] = lines[1][:-1]
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line, report.problem) == (False, 2, "not a JSON record")


def test_deleted_record_is_found(clean_file: Path) -> None:
    """Removing a record leaves a gap in seq: reported on the line after the gap."""
    lines = clean_file.read_bytes().splitlines()
    del lines[2]
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line) == (False, 3)
    assert report.problem is not None and "seq 4 where 3 was expected" in report.problem


def test_deleted_first_record_is_found(clean_file: Path) -> None:
    """Removing the head of the file is caught: the chain may only start at genesis or a rotation."""
    lines = clean_file.read_bytes().splitlines()[1:]
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line) == (False, 1)
    assert report.problem is not None and "does not start here" in report.problem


def test_inserted_record_is_found(clean_file: Path) -> None:
    """A forged record with a correct hash link still pushes the genuine one out of sequence."""
    lines = clean_file.read_bytes().splitlines()
    forged = _encode(event(99), 3, hashlib.sha256(lines[1]).hexdigest(), {})
    lines.insert(2, forged)
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line) == (False, 4)


def test_inserted_junk_line_is_found(clean_file: Path) -> None:
    """A stray line no record accounts for is reported where it is."""
    lines = clean_file.read_bytes().splitlines()
    lines.insert(4, b'{"note":"nothing to see"}')
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line) == (False, 5)


def test_reordered_records_are_found(clean_file: Path) -> None:
    """Swapping two records is reported at the first of them."""
    lines = clean_file.read_bytes().splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    report = verify_file(tampered(clean_file, lines))
    assert (report.ok, report.first_bad_line) == (False, 3)


def test_torn_last_line_is_reported(clean_file: Path) -> None:
    """A last line without its newline is not silently accepted."""
    data = clean_file.read_bytes()
    clean_file.write_bytes(data + b'{"seq":7')
    report = verify_file(str(clean_file))
    assert (report.ok, report.records, report.first_bad_line) == (False, 6, 7)
    assert report.problem is not None and "unterminated" in report.problem


def test_empty_and_missing_files(tmp_path: Path) -> None:
    """An empty file verifies with 0 records; a missing one is a failed report, not an exception."""
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert verify_file(str(empty)).ok and verify_file(str(empty)).records == 0
    missing = verify_file(str(tmp_path / "nope.jsonl"))
    assert not missing.ok and missing.problem is not None


# --- configuration --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "audit.path: required"),
        ({"path": ""}, "audit.path: required"),
        ({"path": "/x", "paht": 1}, "audit: unknown key 'paht'"),
        ({"path": "/x", "write_timeout": 0}, "audit.write_timeout: must be seconds"),
        ({"path": "/x", "write_timeout": "1"}, "audit.write_timeout: must be seconds"),
        ({"path": "/x", "fsync": "yes"}, "audit.fsync: must be true or false"),
        ({"path": "/x", "journald": 1}, "audit.journald: must be true or false"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    """Invalid [audit] settings raise ValueError naming the key."""
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(".", r"\.")):
        audit_from_config(table)


def test_config_defaults(tmp_path: Path) -> None:
    """Defaults: 2 s write timeout, fsync on, no journald."""
    trail = audit_from_config({"path": str(tmp_path / "a.jsonl")})
    assert trail.write_timeout == 2.0
    assert trail._fsync is True and trail._journal is None


def test_journald_without_systemd_python_is_a_config_error() -> None:
    """journald = true without systemd-python installed is refused when the config is read."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["systemd"] = None  # as if systemd-python were not installed
        from signerd.audit import audit_from_config
        try:
            audit_from_config({"path": "/tmp/x", "journald": True})
        except ValueError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("audit.journald: needs systemd-python")


JOURNAL_CHILD = textwrap.dedent(
    """
    import asyncio, json, os, socket, subprocess, sys
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run/systemd"], check=True)
    os.mkdir("/run/systemd/journal")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind("/run/systemd/journal/socket")
    sink.settimeout(5)
    sys.path.insert(0, sys.argv[1])
    from signerd.audit import AuditEvent, audit_from_config
    from signerd.authz import Peer
    trail = audit_from_config({"path": sys.argv[2], "journald": True, "anchor_interval": 3600})
    peer = Peer(pid=7, uid=1001, gid=1001, unit="gateway.service")
    ev = AuditEvent(time=1.0, request_id="rq1", peer=peer, operation="sign", outcome="ok",
                    tenant="acme", key="acme/feedback", kid="acme.feedback.v1",
                    payload_sha256=("ab" * 32,))
    async def main():
        await trail.record(ev)
        await trail.aclose()
    asyncio.run(main())
    got = [sink.recv(65536).decode() for _ in range(3)][1:]  # the start anchor, the record,
    # then the shutdown anchor
    print(json.dumps([dict(x.split("=", 1) for x in d.splitlines() if "=" in x) for d in got]))
    """
)


def test_journald_gets_structured_fields(tmp_path: Path) -> None:
    """With journald = true each record and each anchor also go to the journal (SIGNERD_*).

    Runs in a private mount namespace where /run/systemd/journal/socket is the test's own.
    """
    root = str(Path(__file__).resolve().parents[2])
    path = tmp_path / "audit.jsonl"
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", JOURNAL_CHILD,
         root, str(path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    fields, anchor = json.loads(out.stdout)
    line = path.read_bytes().splitlines()[0]
    assert fields["SIGNERD_HASH"] == hashlib.sha256(line).hexdigest()
    assert fields["SIGNERD_SEQ"] == "1"
    assert fields["SIGNERD_PREV"] == GENESIS
    key = bytes.fromhex((tmp_path / "audit.key").read_text())
    want = hmac.new(key, bytes.fromhex("ab" * 32), hashlib.sha256).hexdigest()
    assert fields["SIGNERD_PAYLOAD_HMAC"] == want
    assert fields["PRIORITY"] == "6"
    assert fields["SIGNERD_OPERATION"] == "sign"
    assert fields["SIGNERD_PEER_UID"] == "1001"
    assert fields["SIGNERD_PEER_UNIT"] == "gateway.service"
    assert fields["SIGNERD_KID"] == "acme.feedback.v1"
    assert fields["SYSLOG_IDENTIFIER"] == "signerd"
    assert fields["SIGNERD_RECORD_ID"].endswith("-1")
    assert (anchor["SIGNERD_ANCHOR"], anchor["SIGNERD_ANCHOR_SEQ"]) == ("shutdown", "1")
    assert anchor["SIGNERD_ANCHOR_HEAD"] == fields["SIGNERD_HASH"]
    assert anchor["SIGNERD_ANCHOR_CHAIN"] == "audit.jsonl"
