"""signerctl audit show / tail on a real daemon's trail: filters, time order, follow, tolerance."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd.cli import main
from signerd.cli._trail import parse_when
from signerd.testing import wait_until

from ..conftest import ROOT, DaemonProcess, start_daemon, unique
from .test_cli import kid_of


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon with two workers: its trail is one file per worker."""
    d = start_daemon(tmp_path_factory.mktemp("trail"), server={"workers": 2})
    yield d
    assert d.stop() == 0, d.log_text()


def _ctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _traffic(d: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """A key signed with over several connections, and one refused sign of a missing key."""
    key = f"{unique('aud')}/feedback"
    sock = ["--socket", str(d.socket_path)]
    assert _ctl(capsys, *sock, "keys", "create", key)[0] == 0
    for i in range(6):
        data = base64.b64encode(f"payload {i}".encode()).decode()
        assert _ctl(capsys, *sock, "sign", key, "--data-b64", data)[0] == 0
    tenant = key.split("/")[0]
    assert _ctl(capsys, *sock, "sign", f"{tenant}/absent", "--data-b64", "aGk=")[0] == 66
    return key, tenant


def _spread(d: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
    """Signs with another tenant's key, a connection each, until two workers' files hold
    records (which worker accepts a connection is the kernel's choice)."""
    key = f"{unique('spr')}/feedback"
    sock = ["--socket", str(d.socket_path)]
    assert _ctl(capsys, *sock, "keys", "create", key)[0] == 0
    for _ in range(200):
        if len([p for p in d.audit_files() if p.stat().st_size > 0]) >= 2:
            return
        assert _ctl(capsys, *sock, "sign", key, "--data-b64", "aGk=")[0] == 0
    raise AssertionError("200 connections all went to one worker")


def _json_lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def test_show_merges_worker_files_in_time_order_and_filters(
    two_workers: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit show reads every worker's file, in time order; --key/--operation keep that key's
    signatures, --outcome refused --tenant the refusal, with its code."""
    key, tenant = _traffic(two_workers, capsys)
    _spread(two_workers, capsys)
    trail = str(two_workers.audit_path.parent)
    code, out, err = _ctl(capsys, "audit", "show", trail, "--json")
    assert (code, err) == (0, "")
    every = _json_lines(out)
    times = [r["time"] for r in every]
    assert times == sorted(times)
    assert len({r["file"] for r in every}) >= 2
    argv = ("audit", "show", trail, "--key", key, "--operation", "sign", "--outcome", "ok")
    # a sign's outcome record follows its answer by a moment (its intent is written ahead)
    wait_until(lambda: len(_json_lines(_ctl(capsys, *argv, "--json")[1])) == 6, what="6 signs")
    code, out, _ = _ctl(capsys, *argv, "--json")
    signed = _json_lines(out)
    assert code == 0 and len(signed) == 6
    assert all(r["outcome"] == "ok" and r["kid"] == f"{tenant}.feedback.v1" for r in signed)
    code, out, _ = _ctl(capsys, "audit", "show", trail, "--tenant", tenant, "--outcome", "refused")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 1
    assert " sign " in lines[0] and "unknown_key" in lines[0] and f"{tenant}/absent" in lines[0]
    assert f"uid={os.getuid()}" in lines[0] and "req=" in lines[0]
    code, out, _ = _ctl(capsys, "audit", "show", trail, "--tenant", tenant, "--code", "unknown_key")
    assert out.splitlines() == lines
    assert (
        _ctl(capsys, "audit", "show", trail, "--tenant", tenant, "--since", "2099-01-01")[1] == ""
    )
    mine = _ctl(
        capsys, "audit", "show", trail, "--key", f"{tenant}/*", "--caller", str(os.getuid())
    )
    # create (intent, outcome), 6 signs (intent, outcome), the refusal
    assert len(mine[1].splitlines()) == 15
    assert _ctl(capsys, "audit", "show", trail, "--key", key, "--caller", "65534")[1] == ""


def test_show_is_tolerant_of_unknown_kinds_and_garbage(
    two_workers: DaemonProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A record of a kind the reader does not know is shown; a line that is not a record
    is skipped and counted on stderr; exit 0."""
    copy = tmp_path / "audit.w9.jsonl"
    shutil.copy(two_workers.audit_files()[0], copy)
    with copy.open("a") as f:
        f.write('{"kind": "intent", "time": 4102444800.5, "request_id": "r1"}\n')
        f.write("not json at all\x1b[2J\n")
    code, out, err = _ctl(capsys, "audit", "show", str(copy))
    assert code == 0
    assert out.splitlines()[-1].startswith("2100-01-01T00:00:00.500Z  intent ")
    assert "1 lines are not records" in err and "line " in err and "\x1b" not in out + err


@contextlib.contextmanager
def _following(trail: str, *more: str) -> Iterator[list[bytes]]:
    """`signerctl audit tail TRAIL -n 1 --follow --json MORE` running; the lines it printed
    so far (a list that grows), until the block ends and it is stopped."""
    argv = ["audit", "tail", trail, "-n", "1", "--follow", "--interval", "0.1", "--json", *more]
    proc = subprocess.Popen(
        [sys.executable, "-m", "signerd.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    out_pipe = proc.stdout
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(out_pipe.readline, b"")))
    reader.start()
    try:
        yield lines
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        reader.join(timeout=10)
        out_pipe.close()


def test_tail_prints_the_last_records_and_follows_new_ones(
    two_workers: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """audit tail -n 2 prints the last two matching records; --follow then prints a record
    written after it started, within a few seconds."""
    key, _ = _traffic(two_workers, capsys)
    trail = str(two_workers.audit_path.parent)
    code, out, _ = _ctl(capsys, "audit", "tail", trail, "-n", "2", "--key", key, "--json")
    assert code == 0 and [r["operation"] for r in _json_lines(out)] == ["sign", "sign"]
    with _following(trail, "--key", key) as lines:
        # its first line (the last sign) says it has read the files to their ends
        first = wait_until(lambda: list(lines), timeout=20.0, what="the last record")
        assert json.loads(first[0])["operation"] == "sign"
        sock = ["--socket", str(two_workers.socket_path)]
        assert _ctl(capsys, *sock, "keys", "rotate", key)[0] == 0

        def rotated() -> list[dict[str, Any]]:
            records = [json.loads(line) for line in list(lines)[1:]]
            return [r for r in records if r["operation"] == "rotate" and r["outcome"] == "ok"]

        record = wait_until(rotated, timeout=20.0, what="the followed rotate record")[0]
        assert record["key"] == key and record["kid"] == kid_of(key, 2)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-12-06T10:00:00Z", 1796551200.0),
        ("2026-12-06T11:00:00+01:00", 1796551200.0),
        ("2026-12-06T10:00", 1796551200.0),
        ("2026-12-06", 1796515200.0),
        ("1796551200", 1796551200.0),
        ("24h", 1000.0 - 86400),
        ("30m", 1000.0 - 1800),
    ],
)
def test_times_are_rfc3339_unix_or_an_age(text: str, expected: float) -> None:
    """--since/--until: RFC 3339 (UTC when no zone), a date, unix seconds, or an age."""
    assert parse_when(text, now=1000.0) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-12-06T10:00:00Z\n", "2026-13-45", "5y"])
def test_a_bad_time_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    """An unreadable --since exits 64 and names the flag's problem."""
    trail = tmp_path / "a.jsonl"
    trail.write_text("")
    code, _, err = _ctl(capsys, "audit", "show", str(trail), "--since", text)
    assert code == os.EX_USAGE and err.startswith("signerctl: usage: not a time")


def _record(n: int) -> str:
    return json.dumps({"time": 1796551200.0 + n, "operation": "sign", "outcome": "ok", "seq": n})


def test_a_followed_file_replaced_or_cut_is_read_from_its_start(tmp_path: Path) -> None:
    """Source (what --follow reads): new complete lines only; a partial line waits for its
    newline; a file replaced under its name (rotation) or cut shorter is read from its start."""
    from signerd.cli._trail import Skipped, Source

    path = tmp_path / "audit.jsonl"
    path.write_text(_record(1) + "\n" + _record(2)[:10])
    source, skipped = Source(str(path)), Skipped()
    assert [r["seq"] for r in source.read(skipped)[0]] == [1]
    with path.open("a") as f:
        f.write(_record(2)[10:] + "\n")
    assert [r["seq"] for r in source.read(skipped)[0]] == [2]
    assert source.read(skipped)[0] == []
    (tmp_path / "new").write_text(_record(3) + "\n")
    os.replace(tmp_path / "new", path)  # rotated: a new file under the name
    assert [r["seq"] for r in source.read(skipped)[0]] == [3]
    with path.open("a") as f:
        f.write(_record(4) + "\n" + _record(5) + "\n")
    assert [r["seq"] for r in source.read(skipped)[0]] == [4, 5]
    path.write_text(_record(6) + "\n")  # cut shorter in place (same inode)
    assert [r["seq"] for r in source.read(skipped)[0]] == [6]
    assert skipped.count == 0


def test_follow_picks_up_a_new_file_in_a_directory(tmp_path: Path) -> None:
    """audit tail --follow DIR prints the records of a trail file that appears after it
    started (a new worker's, a rotation's)."""
    trail = tmp_path / "audit"
    trail.mkdir()
    (trail / "audit.w0.jsonl").write_text(_record(1) + "\n")
    with _following(str(trail)) as lines:
        wait_until(lambda: list(lines), timeout=20.0, what="the last record")
        (trail / "audit.w1.jsonl").write_text(_record(2) + "\n" + _record(3) + "\n")
        wait_until(lambda: len(lines) >= 3, timeout=20.0, what="the new file's records")
        assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
