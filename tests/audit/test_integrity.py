"""Audit trail hardening: anchors see a lost tail, a live file that shrinks is an event, sets of
files (rotations, one chain per worker) verify as a whole, payloads are keyed, records unique."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signerd._config import load
from signerd.audit import GENESIS, AuditEvent, AuditTrail, audit_from_config, read_anchors
from signerd.authz import Peer
from signerd.cli import main
from signerd.client import Client
from signerd.testing import wait_until

from ..conftest import DaemonProcess, daemon_config, start_daemon, to_toml, unique

pytestmark = pytest.mark.timeout(90)

PEER = Peer(pid=4242, uid=1001, gid=1001, unit="gateway.service")
KEY = bytes(range(32))


def event(i: int, request_id: str | None = None, payload: bytes | None = None) -> AuditEvent:
    data = payload if payload is not None else b"payload %d" % i
    return AuditEvent(
        time=1795000000.5 + i,
        request_id=request_id or f"req-{i}",
        peer=PEER,
        operation="sign",
        outcome="ok",
        tenant="acme",
        key="acme/feedback",
        kid="acme.feedback.v1",
        payload_sha256=(hashlib.sha256(data).hexdigest(),),
    )


def trail(path: Path, interval: float = 3600.0) -> AuditTrail:
    return AuditTrail(
        str(path), anchor_path=f"{path}.anchor", anchor_interval=interval, hmac_key=KEY
    )


async def write(path: Path, n: int, start: int = 0) -> None:
    """n records in a trail of its own, closed (so anchored at shutdown)."""
    t = trail(path)
    for i in range(start, start + n):
        await t.record(event(i))
    await t.aclose()


def anchors(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(f"{path}.anchor").read_bytes().splitlines()]


Verify = Callable[..., tuple[int, str]]


@pytest.fixture
def verify(capsys: pytest.CaptureFixture[str]) -> Verify:
    """signerctl audit verify in-process: exit code and stdout."""

    def run(*argv: str) -> tuple[int, str]:
        capsys.readouterr()
        json_out = ["--json"] if "--json" in argv else []
        rest = [a for a in argv if a != "--json"]
        code = main(["--socket", "/nonexistent/s.sock", *json_out, "audit", "verify", *rest])
        return code, capsys.readouterr().out

    return run


def rewrite(path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> None:
    """Edit records and recompute every hash after them: a forger without the anchors."""
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    edit(recs)
    prev, out = GENESIS, []
    for rec in recs:
        rec["prev"] = prev
        line = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        out.append(line + b"\n")
    path.write_bytes(b"".join(out))


# --- verify against the anchor --------------------------------------------------------


async def test_intact_trail_verifies_with_its_shutdown_anchor(
    tmp_path: Path, verify: Verify
) -> None:
    """A closed trail is anchored at its head; verify says the anchor holds (exit 0)."""
    path = tmp_path / "audit.jsonl"
    await write(path, 5)
    start, anchor = anchors(path)
    assert (start["anchor"], start["seq"], start["head"]) == ("start", 0, GENESIS)
    assert (anchor["anchor"], anchor["seq"], anchor["chain"]) == ("shutdown", 5, "audit.jsonl")
    assert anchor["chains"] == ["audit.jsonl"] and anchor["run"] == start["run"]
    assert anchor["head"] == hashlib.sha256(path.read_bytes().splitlines()[-1]).hexdigest()
    code, out = verify(str(path))
    assert code == os.EX_OK and "anchored at seq 5" in out


async def test_a_running_trail_anchored_only_at_its_start(tmp_path: Path, verify: Verify) -> None:
    """Records written since the start anchor and none anchored yet (a running daemon's
    trail): ok, and the output says no record is anchored yet."""
    path = tmp_path / "audit.jsonl"
    t = trail(path)
    try:
        for i in range(3):
            await t.record(event(i))
        code, out = verify(str(path))
    finally:
        await t.aclose()
    assert code == os.EX_OK, out
    assert out.startswith("ok: 3 records, chain intact; no record anchored yet ("), out


async def test_empty_file_against_its_anchor(tmp_path: Path, verify: Verify) -> None:
    """An emptied file verifies alone but not against the anchor: the chain is missing."""
    path = tmp_path / "audit.jsonl"
    await write(path, 3)
    path.write_bytes(b"")
    assert verify("--no-anchor", str(path))[0] == os.EX_OK
    code, out = verify(str(path))
    assert code == os.EX_DATAERR
    assert "incomplete" in out and "no file of the set holds this chain" in out


async def test_last_record_edited(tmp_path: Path, verify: Verify) -> None:
    """Editing the last record (nothing chains after it) is caught by the anchor's head hash."""
    path = tmp_path / "audit.jsonl"
    await write(path, 4)
    lines = path.read_bytes().splitlines()
    lines[-1] = lines[-1].replace(b'"outcome":"ok"', b'"outcome":"permission_denied"')
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    assert verify("--no-anchor", str(path))[0] == os.EX_OK
    code, out = verify(str(path))
    assert code == os.EX_DATAERR and "seq 4" in out and "differs" in out


async def test_last_record_removed(tmp_path: Path, verify: Verify) -> None:
    """Removing the last record is a missing tail: the anchor names a seq the file lacks."""
    path = tmp_path / "audit.jsonl"
    await write(path, 4)
    path.write_bytes(b"".join(line + b"\n" for line in path.read_bytes().splitlines()[:-1]))
    assert verify("--no-anchor", str(path))[0] == os.EX_OK
    code, out = verify("--json", str(path))
    report = json.loads(out)
    assert code == os.EX_DATAERR and report["ok"] is False and report["head_seq"] == 4
    assert "the set ends at seq 3" in report["problem"]


async def test_rewrite_with_recomputed_hashes(tmp_path: Path, verify: Verify) -> None:
    """A rewrite that recomputes every hash passes the chain check, never the anchor."""
    path = tmp_path / "audit.jsonl"
    await write(path, 6)

    def deny(recs: list[dict[str, Any]]) -> None:
        recs[2]["outcome"] = "permission_denied"

    rewrite(path, deny)
    assert verify("--no-anchor", str(path))[0] == os.EX_OK
    code, out = verify(str(path))
    assert code == os.EX_DATAERR and "seq 6" in out and "edited or rewritten" in out
    rewrite(path, lambda recs: recs[0].update(outcome="x"))  # from the very first record
    code, out = verify(str(path))
    assert code == os.EX_DATAERR and "no file of the set holds this chain" in out


async def test_anchor_after_a_torn_anchor_line_stays_whole(tmp_path: Path, verify: Verify) -> None:
    """An anchor file ending in a line torn by a crash gets its next anchor on a line of its own."""
    path = tmp_path / "audit.jsonl"
    await write(path, 2)
    with open(f"{path}.anchor", "ab") as handle:
        handle.write(b'{"anchor":"sched')
    await write(path, 2, start=2)
    got, bad = read_anchors(f"{path}.anchor")
    assert [(a.kind, a.seq) for a in got] == [("start", 0), ("shutdown", 2), ("start", 2),
                                              ("shutdown", 4)] and bad == [3]  # fmt: skip
    code, out = verify(str(path))
    assert code == os.EX_OK and "anchored at seq 4" in out and "line 3: not an anchor" in out


async def test_anchor_written_on_schedule_only_when_the_head_moved(tmp_path: Path) -> None:
    """The schedule writes an anchor when new records were written, never a repeat of the same head."""
    path = tmp_path / "audit.jsonl"
    t = trail(path, interval=0.05)
    await t.record(event(0))
    await asyncio.sleep(0.4)
    assert [(a["anchor"], a["seq"]) for a in anchors(path)] == [("start", 0), ("schedule", 1)]
    await t.record(event(1))
    await t.record(event(2))
    await asyncio.sleep(0.4)
    await t.aclose()
    seqs = [a["seq"] for a in anchors(path)]  # 2 may or may not have had a tick of its own
    assert seqs in ([0, 1, 3], [0, 1, 2, 3])
    assert [a["anchor"] for a in anchors(path)][1:] == ["schedule"] * (len(seqs) - 1)


async def test_live_truncation_is_a_security_event(
    tmp_path: Path, verify: Verify, caplog: pytest.LogCaptureFixture
) -> None:
    """A live file cut to zero is logged, anchored as truncated and reported unless its copy is in the set."""
    path, copy = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    t = trail(path)
    for i in range(3):
        await t.record(event(i))
    shutil.copyfile(path, copy)
    os.truncate(path, 0)
    with caplog.at_level(logging.CRITICAL, logger="signerd.audit"):
        await t.record(event(3))
    await t.aclose()
    assert any("signerd.audit_truncated" in r.getMessage() for r in caplog.records)
    kinds = [(a["anchor"], a["seq"], a["file"]["first_seq"]) for a in anchors(path)]
    assert kinds == [("start", 0, 0), ("truncated", 3, 1), ("shutdown", 4, 4)]
    code, out = verify(str(path))
    assert code == os.EX_DATAERR and "records cut from its file" in out and "seq 1 to 3" in out
    code, out = verify("--anchor", f"{path}.anchor", str(copy), str(path))
    assert code == os.EX_OK, out


async def test_restart_on_a_file_emptied_while_stopped(
    tmp_path: Path, verify: Verify, caplog: pytest.LogCaptureFixture
) -> None:
    """A start on a file lacking its anchored head is logged, anchored as lost, and verify reports it."""
    path = tmp_path / "audit.jsonl"
    await write(path, 3)
    path.write_bytes(b"")
    with caplog.at_level(logging.CRITICAL, logger="signerd.audit"):
        await write(path, 1, start=3)
    assert any("signerd.audit_truncated" in r.getMessage() for r in caplog.records)
    (rec,) = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert rec["seq"] == 4 and rec["rotated_from"] == rec["prev"] == anchors(path)[1]["head"]
    assert [(a["anchor"], a["seq"]) for a in anchors(path)] == [
        ("start", 0), ("shutdown", 3), ("truncated", 3), ("shutdown", 4),
    ]  # fmt: skip
    assert verify("--no-anchor", str(path))[0] == os.EX_OK
    code, out = verify(str(path))
    assert code == os.EX_DATAERR and "records cut from its file" in out and "seq 1 to 3" in out


async def test_restart_on_an_intact_file_logs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart on the file as it was left is no event: no critical line, no truncated anchor."""
    path = tmp_path / "audit.jsonl"
    await write(path, 2)
    with caplog.at_level(logging.INFO, logger="signerd.audit"):
        await write(path, 2, start=2)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [a["anchor"] for a in anchors(path)] == ["start", "shutdown", "start", "shutdown"]


async def test_rotation_by_rename_is_followed(tmp_path: Path, verify: Verify) -> None:
    """Rename + reopen anchors the old head; the set verifies, the old file without its successor does not."""
    path, old = tmp_path / "audit.jsonl", tmp_path / "audit.jsonl.1"
    t = trail(path)
    for i in range(3):
        await t.record(event(i))
    path.rename(old)
    t.reopen()
    for i in range(3, 5):
        await t.record(event(i))
    await t.aclose()
    assert [(a["anchor"], a["seq"]) for a in anchors(path)] == [
        ("start", 0), ("rotated", 3), ("shutdown", 5),
    ]  # fmt: skip
    code, out = verify(str(tmp_path))
    assert code == os.EX_OK and out.startswith("ok: 5 records") and "seq 5" in out
    assert verify(str(path))[0] == os.EX_OK
    code, out = verify("--anchor", f"{path}.anchor", str(old))
    assert code == os.EX_DATAERR and "the set ends at seq 3" in out


async def test_multi_writer_set_with_one_file_missing(tmp_path: Path, verify: Verify) -> None:
    """A missing worker file, middle or newest rotation fails the set; the oldest rotation may go."""
    w0, w1 = tmp_path / "audit.w0.jsonl", tmp_path / "audit.w1.jsonl"
    t0, t1 = trail(w0), trail(w1)
    for n in range(3):  # w0: .2 (seq 1-2), .1 (3-4), live (5-6)
        for i in range(2):
            await t0.record(event(10 * n + i))
            await t1.record(event(100 + 10 * n + i))
        if n < 2:
            if Path(f"{w0}.1").exists():
                Path(f"{w0}.1").rename(f"{w0}.2")
            w0.rename(f"{w0}.1")
            t0.reopen()
    await t0.aclose()
    await t1.aclose()
    code, out = verify(str(tmp_path))
    assert code == os.EX_OK and "12 records" in out, out
    assert (
        verify(
            str(tmp_path / "audit.w*.jsonl*"), "--anchor", f"{w0}.anchor", f"--anchor={w1}.anchor"
        )[0]
        == 0
    )
    code, out = verify(str(tmp_path / "audit.w*.jsonl*"), "--anchor", f"{w0}.anchor")
    assert code == os.EX_DATAERR and "no anchor names this file's chain" in out, out  # w1's
    aside = tmp_path.parent / f"{tmp_path.name}-aside"
    aside.mkdir()
    for name, want in (
        (w1.name, "chain audit.w1.jsonl"),
        (f"{w0.name}.1", "records seq 3 to 4 are missing"),
        (w0.name, "the set ends at seq 4"),
    ):
        (tmp_path / name).rename(aside / name)
        code, out = verify(str(tmp_path))
        assert code == os.EX_DATAERR and want in out, (name, out)
        (aside / name).rename(tmp_path / name)
    Path(f"{w0}.2").unlink()
    code, out = verify(str(tmp_path))
    assert code == os.EX_OK and "10 records" in out


async def test_workers_from_config_keep_their_own_chains(tmp_path: Path, verify: Verify) -> None:
    """Workers keep audit.wN.jsonl chains, own anchors, one key; the directory verifies as a set."""
    table = {"path": str(tmp_path / "audit.jsonl")}
    trails = [audit_from_config(table, worker=n) for n in (0, 1)]
    assert [t.path for t in trails] == [str(tmp_path / f"audit.w{n}.jsonl") for n in (0, 1)]
    assert {t.key_path for t in trails} == {str(tmp_path / "audit.key")}
    for n, t in enumerate(trails):
        await t.record(event(n))
        await t.aclose()
    assert anchors(tmp_path / "audit.w1.jsonl")[0]["chain"] == "audit.w1.jsonl"
    assert verify(str(tmp_path))[0] == os.EX_OK
    (tmp_path / "audit.w1.jsonl").unlink()
    code, out = verify(str(tmp_path))
    assert code == os.EX_DATAERR and "chain audit.w1.jsonl" in out


# --- keyed payload hashes and unique records ------------------------------------------------


async def test_payload_hmac_and_the_auditor_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Records keep HMAC(key, SHA-256(payload)); payload-hash with the 0600 key file prints that value."""
    path = tmp_path / "audit.jsonl"
    t = audit_from_config({"path": str(path)})
    await t.record(event(0, payload=b"yes"))
    await t.aclose()
    key_file = tmp_path / "audit.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert hashlib.sha256(b"yes").hexdigest() not in text
    payload = tmp_path / "payload"
    payload.write_bytes(b"yes")
    capsys.readouterr()
    assert main(["audit", "payload-hash", "--key", str(key_file), "--data-file", str(payload)]) == 0
    value = capsys.readouterr().out.strip()
    assert json.loads(text)["payload_hmac"] == [value]
    key = bytes.fromhex(key_file.read_text())
    assert value == hmac.new(key, hashlib.sha256(b"yes").digest(), hashlib.sha256).hexdigest()
    sha = hashlib.sha256(b"yes").hexdigest()
    assert main(["audit", "payload-hash", "--key", str(key_file), "--sha256", sha]) == 0
    assert capsys.readouterr().out.strip() == value
    t2 = audit_from_config({"path": str(tmp_path / "other" / "audit.jsonl")})
    await t2.record(event(0, payload=b"yes"))
    await t2.aclose()
    assert value not in (tmp_path / "other" / "audit.jsonl").read_text()  # a key per trail


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"anchor_interval": 0}, r"audit\.anchor_interval: must be seconds"),
        ({"anchor_interval": "10"}, r"audit\.anchor_interval: must be seconds"),
        ({"anchor_interval": True}, r"audit\.anchor_interval: must be seconds"),
        ({"anchor": ""}, r"audit\.anchor: must be a file path"),
        ({"key": 5}, r"audit\.key: must be a file path"),
    ],
)
def test_anchor_and_key_settings_are_checked(table: dict[str, Any], message: str) -> None:
    """Invalid anchor, anchor_interval or key settings raise ValueError naming the key."""
    with pytest.raises(ValueError, match=message):
        audit_from_config({"path": "/nonexistent/audit.jsonl", **table})


def test_anchor_and_key_defaults(tmp_path: Path) -> None:
    """Defaults: anchors every 10 s to <path>.anchor, the key in audit.key beside the trail."""
    t = audit_from_config({"path": str(tmp_path / "audit.jsonl")})
    assert (t.anchor_path, t.anchor_interval) == (f"{tmp_path}/audit.jsonl.anchor", 10.0)
    assert t.key_path == f"{tmp_path}/audit.key" and not Path(t.key_path).exists()


def test_relative_anchor_and_key_paths_follow_the_config_file(tmp_path: Path) -> None:
    """Relative audit.anchor and audit.key are relative to the configuration file, like path."""
    doc = daemon_config(tmp_path, audit={"anchor": "a/trail.anchor", "key": "k/audit.key"})
    (tmp_path / "signerd.toml").write_text(to_toml(doc))
    config = load(str(tmp_path / "signerd.toml"))
    assert config.audit["anchor"] == str(tmp_path / "a" / "trail.anchor")
    assert config.audit["key"] == str(tmp_path / "k" / "audit.key")


def test_key_file_open_to_others_is_a_config_error(tmp_path: Path) -> None:
    """A payload key readable by other users is refused when the config is read."""
    key = tmp_path / "audit.key"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o644)
    with pytest.raises(ValueError, match=r"audit\.key: .*readable or writable by others"):
        audit_from_config({"path": str(tmp_path / "audit.jsonl")})
    key.chmod(0o640)
    assert audit_from_config({"path": str(tmp_path / "audit.jsonl")}).key_path == str(key)


async def test_record_ids_are_unique_when_request_ids_repeat(tmp_path: Path) -> None:
    """The daemon's record_id (boot id + seq) differs even when callers reuse a request id."""
    path = tmp_path / "audit.jsonl"
    for _ in range(2):
        t = trail(path)
        await t.record(event(0, request_id="same"))
        await t.record(event(1, request_id="same"))
        await t.aclose()
    recs = [json.loads(line) for line in path.read_bytes().splitlines()]
    assert {r["request_id"] for r in recs} == {"same"}
    ids = [r["record_id"] for r in recs]
    assert len(set(ids)) == 4 and len({i.split("-")[0] for i in ids}) == 2


def test_v1_records_still_verify(tmp_path: Path, verify: Verify) -> None:
    """Records of the earlier format (payload_sha256, no record_id) verify as before."""
    path = tmp_path / "audit.jsonl"
    prev, out = GENESIS, []
    for seq in (1, 2, 3):
        rec = {"v": 1, "seq": seq, "prev": prev, "payload_sha256": ["ab" * 32], "outcome": "ok"}
        line = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        out.append(line + b"\n")
    path.write_bytes(b"".join(out))
    code, text = verify(str(path))
    assert code == os.EX_OK and text.startswith("ok: 3 records, chain intact")


# --- against a real daemon ------------------------------------------------------------------


def sign_some(d: DaemonProcess, n: int) -> None:
    with Client(d.socket_path, timeout=30.0) as c:
        key = f"{unique('au')}/k"
        c.create_key(key)
        for i in range(n):
            c.sign(key, b"data %d" % i)


def last_hash(path: Path) -> tuple[int, str]:
    line = path.read_bytes().splitlines()[-1]
    return json.loads(line)["seq"], hashlib.sha256(line).hexdigest()


def test_daemon_anchors_on_schedule(tmp_path: Path) -> None:
    """A running daemon anchors its head within the interval after records were written."""
    d = start_daemon(tmp_path / "d", server={"workers": 1}, audit={"anchor_interval": 0.2})
    try:
        sign_some(d, 3)
        anchor = Path(f"{d.audit_path}.anchor")

        def anchored() -> bool:
            got, _ = read_anchors(str(anchor)) if anchor.exists() else ([], [])
            return bool(got) and (got[-1].seq, got[-1].head) == last_hash(d.audit_path)

        wait_until(anchored, 5.0)
        assert read_anchors(str(anchor))[0][-1].kind == "schedule"
    finally:
        assert d.stop() == 0, d.log_text()


def test_daemon_anchors_at_shutdown(tmp_path: Path, verify: Verify) -> None:
    """SIGTERM writes a shutdown anchor naming the last record; the trail then verifies."""
    d = start_daemon(tmp_path / "d", server={"workers": 1}, audit={"anchor_interval": 3600})
    try:
        sign_some(d, 2)
    finally:
        assert d.stop() == 0, d.log_text()
    got, bad = read_anchors(f"{d.audit_path}.anchor")
    assert bad == [] and [a.kind for a in got] == ["start", "shutdown"]
    assert (got[1].seq, got[1].head) == last_hash(d.audit_path)
    code, out = verify(str(d.audit_path))
    assert code == os.EX_OK and f"anchored at seq {got[1].seq}" in out


def test_daemon_logs_a_live_file_that_shrinks(tmp_path: Path, verify: Verify) -> None:
    """A daemon logs and anchors its live trail shrinking (no request needed) and keeps signing."""
    d = start_daemon(tmp_path / "d", server={"workers": 1}, audit={"anchor_interval": 0.2})
    try:
        sign_some(d, 2)
        os.truncate(d.audit_path, 0)
        wait_until(lambda: "signerd.audit_truncated" in d.log_text(), 5.0)
        assert "level=critical" in d.log_text()
        sign_some(d, 1)
    finally:
        assert d.stop() == 0, d.log_text()
    got, _ = read_anchors(f"{d.audit_path}.anchor")
    assert "truncated" in [a.kind for a in got]
    code, out = verify(str(d.audit_path))
    assert code == os.EX_DATAERR and "records cut from its file" in out


def test_daemon_sighup_rotation_set_verifies(tmp_path: Path, verify: Verify) -> None:
    """Rename + SIGHUP: the old file's head is anchored and the directory verifies as one set."""
    d = start_daemon(tmp_path / "d", server={"workers": 1}, audit={"anchor_interval": 3600})
    try:
        sign_some(d, 2)
        d.audit_path.rename(f"{d.audit_path}.1")
        d.sighup()
        wait_until(lambda: Path(f"{d.audit_path}.anchor").exists(), 5.0)
        sign_some(d, 1)
    finally:
        assert d.stop() == 0, d.log_text()
    kinds = [a.kind for a in read_anchors(f"{d.audit_path}.anchor")[0]]
    assert kinds == ["start", "rotated", "shutdown"]
    code, out = verify(str(d.audit_path.parent))
    assert code == os.EX_OK, out
