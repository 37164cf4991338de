"""Signed checkpoints that left the host catch a trail rewritten with its anchors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from signerd.cli import main
from signerd.client import Client
from signerd.testing import wait_until

from ..conftest import unique
from ..support.rsyslog import Rsyslog, wait_for
from .conftest import checkpointed_heads, forwarding_daemon, heads, settled_lines, sign_many

pytestmark = pytest.mark.timeout(180)


def verify(*argv: str) -> tuple[int, str]:
    """signerctl audit verify in-process: exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["--socket", "/nonexistent/s.sock", "audit", "verify", *argv])
    return code, out.getvalue()


def _hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def rewrite(trail: Path, anchors: Path, victim: int) -> None:
    """What root on the host can do: edit record ``victim``, recompute every later hash
    (prev links) and rewrite the anchor file to name the new hashes."""
    lines = trail.read_bytes().splitlines()
    out: list[bytes] = []
    hashes: dict[int, str] = {}
    prev = None
    for line in lines:
        rec = json.loads(line)
        if rec["seq"] == victim:
            rec["key"] = "someone/else"
        if prev is not None:
            rec["prev"] = prev
        new = json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
        prev = hashes[rec["seq"]] = _hash(new)
        out.append(new)
    trail.write_bytes(b"\n".join(out) + b"\n")
    first = hashes[json.loads(out[0])["seq"]]
    fixed = []
    for line in anchors.read_bytes().splitlines():
        a = json.loads(line)
        if a["seq"] in hashes:
            a["head"] = hashes[a["seq"]]
        a["file"]["first_hash"] = first
        fixed.append(json.dumps(a, sort_keys=True, separators=(",", ":")).encode())
    anchors.write_bytes(b"\n".join(fixed) + b"\n")


def test_rewritten_trail_and_anchors_are_caught_by_forwarded_checkpoints(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """A trail rewritten with recomputed hashes and rewritten local anchors passes the
    local check but fails against the signed checkpoints the collector wrote; the intact
    trail passes both."""
    key = f"{unique('cp')}/k"
    with forwarding_daemon(tmp_path / "d", collector) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
            jwks = {"keys": c.jwks()}
        assert sign_many(d, key, 40) == 40
        want = settled_lines(d)
        wait_for(collector, sum(len(v) for v in want.values()))
        wait_until(
            lambda: checkpointed_heads(collector) == heads(want),
            timeout=60,
            what="checkpoints of every chain's head",
        )
        audit_dir = d.audit_path.parent
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    forwarded = str(collector.out)
    args = ["--forwarded", forwarded, "--jwks", str(jwks_file), "--host", "host-a"]
    code, text = verify(str(audit_dir), *args)
    assert code == 0, text
    assert "signed checkpoints" in text

    chain = max(want, key=lambda name: len(want[name]))  # the worker that signed most
    trail = audit_dir / chain
    records = trail.read_bytes().splitlines()
    assert len(records) > 5
    rewrite(trail, audit_dir / f"{chain}.anchor", victim=json.loads(records[3])["seq"])
    code, text = verify(str(audit_dir))
    assert code == 0, text  # the attack works against what is on the host alone
    code, text = verify(str(audit_dir), *args)
    assert code == 65, text
    assert "differs" in text or "rewritten" in text, text


def test_a_forged_checkpoint_fails_the_check(tmp_path: Path, collector: Rsyslog) -> None:
    """A checkpoint whose signature does not verify (edited in the collector's file), or
    whose kid the JWKS lacks, fails the check instead of being ignored."""
    key = f"{unique('cp')}/k"
    with forwarding_daemon(tmp_path / "d", collector) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
            jwks = {"keys": c.jwks()}
        sign_many(d, key, 5)
        wait_for(collector, 1, msgid="checkpoint")
        audit_dir = d.audit_path.parent
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    data = collector.out.read_bytes()
    match = re.search(rb'"records":([0-9]+)', data)
    assert match is not None
    more = b'"records":%d' % (int(match.group(1)) + 1)
    forged = tmp_path / "forged.log"
    forged.write_bytes(data[: match.start()] + more + data[match.end() :])
    code, text = verify(str(audit_dir), "--forwarded", str(forged), "--jwks", str(jwks_file))
    assert code == 65, text
    assert "signature does not verify" in text, text
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"keys": []}))  # a JWKS without the checkpoint key
    code, text = verify(str(audit_dir), "--forwarded", str(collector.out), "--jwks", str(other))
    assert code == 65, text
    assert "not in the JWKS" in text, text
