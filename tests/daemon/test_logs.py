"""signerd's log lines outside systemd: logfmt with UTC times; key lifecycle events at info."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from signerd.daemon._logfmt import MAX_VALUE, LogfmtFormatter, logfmt_value

from ..conftest import ROOT, DaemonProcess, start_daemon, unique, wait_until
from ..support.openbao import vault_backend_config
from ..support.rawhttp import request

_PAIR_RE = re.compile(r'([^\s="]+)(?:=("(?:[^"\\]|\\.)*"|[^\s="]*))?(?:\s+|$)')
_TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")


def parse_logfmt(line: str) -> list[tuple[str, str | None]]:
    """A logfmt line as (key, value) pairs; AssertionError when it is not logfmt."""
    pairs: list[tuple[str, str | None]] = []
    pos = 0
    while pos < len(line):
        m = _PAIR_RE.match(line, pos)
        assert m is not None and m.end() > pos, f"not logfmt at {pos}: {line!r}"
        value = m[2]
        if value is not None and value.startswith('"'):
            value = re.sub(r"\\(.)", lambda e: {"n": "\n", "t": "\t"}.get(e[1], e[1]), value[1:-1])
        pairs.append((m[1], value))
        pos = m.end()
    return pairs


def record(msg: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord("signerd.test", logging.WARNING, __file__, 1, msg, args, None)


@pytest.mark.parametrize(
    "value",
    ["plain", "two words", 'say "hi"', "a=b", "back\\slash", "line\nbreak", "", "tab\there"],
)
def test_values_round_trip_through_logfmt(value: str) -> None:
    """A value with spaces, quotes, '=', backslashes or newlines stays one logfmt value."""
    line = LogfmtFormatter().format(record("signerd.event error=%s next=%d", value, 7))
    pairs = dict(parse_logfmt(line))
    assert (pairs["error"], pairs["next"], pairs["level"]) == (value, "7", "warning")
    assert "\n" not in line and _TS_RE.fullmatch(str(pairs["ts"]))


def test_timestamps_are_utc_with_zone_and_values_are_bounded() -> None:
    """The ts field is RFC 3339 UTC ('Z'), and an overlong value is cut, not copied whole."""
    rec = record("signerd.event error=%s", "x" * (MAX_VALUE * 4))
    rec.created = 1_795_000_000.25
    pairs = dict(parse_logfmt(LogfmtFormatter().format(rec)))
    assert pairs["ts"] == "2026-11-18T11:06:40.250Z"
    assert len(str(pairs["error"])) == MAX_VALUE + 1
    assert logfmt_value("a\x01b") == '"a\\u0001b"'


def test_forged_keys_cannot_be_injected() -> None:
    """A value holding ' level=error' cannot add a key to the line."""
    line = LogfmtFormatter().format(record("signerd.event path=%s", "/x level=error"))
    keys = [k for k, _ in parse_logfmt(line)]
    assert keys.count("level") == 1 and dict(parse_logfmt(line))["path"] == "/x level=error"


def events(d: DaemonProcess, key: str) -> list[dict[str, str | None]]:
    """The lifecycle events (and refusals) in the daemon's log about ``key``."""
    found = []
    for line in d.log_text().splitlines():
        if " signerd.key_" not in line:
            continue
        pairs = dict(parse_logfmt(line))
        if pairs.get("key") == key or "signerd.key_refused" in pairs:
            found.append(pairs)
    return found


def _lifecycle(d: DaemonProcess, backend: str) -> None:
    sock = str(d.socket_path)
    key = f"{unique('lg')}/k"
    version = f"/v1/keys/{key}/versions"
    kid1, kid2 = f"{key.replace('/', '.')}.v1", f"{key.replace('/', '.')}.v2"
    steps: list[tuple[str, Any, int]] = [
        ("/v1/keys", {"key": key}, 201),
        (f"/v1/keys/{key}/rotate", {"pending": True}, 200),
        (f"{version}/2/promote", {}, 200),
        (f"{version}/2/promote", {}, 409),  # refused: v2 is active already
        (f"{version}/1/retire", {}, 200),
        (f"{version}/1/destroy", {"confirm": kid1, "now": True}, 200),
    ]
    for path, body, status in steps:
        reply = request(sock, "POST", path, body)
        assert reply.status == status, (path, reply.body)
    want = [
        ("signerd.key_created", kid1, "active"),
        ("signerd.key_rotated", kid2, "pending"),
        ("signerd.key_promoted", kid2, "active"),
        ("signerd.key_retired", kid1, "retired"),
        ("signerd.key_destroyed", kid1, "destroyed"),
    ]

    def seen() -> list[dict[str, str | None]]:
        got = events(d, key)
        return got if len(got) >= len(want) + 1 else []

    got = wait_until(seen, timeout=10.0, what="the lifecycle events in the log")
    changes = [e for e in got if "signerd.key_refused" not in e]
    assert [
        (n, e["kid"], e["state"]) for e in changes for n in e if n.startswith("signerd.")
    ] == want
    assert all(e["level"] == "info" and e["backend"] == backend for e in changes)
    (refused,) = [e for e in got if "signerd.key_refused" in e]
    assert (refused["op"], refused["outcome"], refused["level"]) == (
        "promote",
        "invalid_state",
        "info",
    )


def test_lifecycle_events_on_softhsm(tmp_path: Path) -> None:
    """create, rotate, promote, retire, destroy and a refusal are info events on PKCS#11."""
    d = start_daemon(tmp_path / "d", server={"log_level": "info"})
    try:
        _lifecycle(d, "hsm")
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]


def test_lifecycle_events_on_openbao(tmp_path: Path, openbao_dev: Any) -> None:
    """The same events, the same fields, on an OpenBao transit backend."""
    d = start_daemon(
        tmp_path / "d",
        keys={"default_backend": "bao"},
        backends={"bao": vault_backend_config(openbao_dev)},
    )
    try:
        _lifecycle(d, "bao")
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]


_TOKEN_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*=(%[-0-9.]*[sdfor]|[A-Za-z0-9_./-]+|\{[a-z_.]+\})")


def test_every_log_call_is_an_event_then_key_value_pairs() -> None:
    """Each log call in signerd formats 'signerd.EVENT key=%s …': no prose outside a quoted value."""
    import ast

    bad = []
    for path in (ROOT / "signerd").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            if node.func.attr not in ("debug", "info", "warning", "error", "critical", "exception"):
                continue
            first = node.args[0] if node.args else None
            if isinstance(first, ast.JoinedStr):
                text = "".join(
                    str(v.value) if isinstance(v, ast.Constant) else "{x.x}" for v in first.values
                )
            elif isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
            else:
                continue
            if not text.startswith("signerd"):
                continue
            event, *pairs = text.split(" ")
            if not re.fullmatch(r"signerd[a-z0-9_.%]*", event) or not all(
                _TOKEN_RE.fullmatch(p) for p in pairs
            ):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text!r}")
    assert not bad, bad
