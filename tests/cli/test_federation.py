"""signerctl telemetry and feedback commands against a real daemon: round trips and exit codes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from ..conftest import DaemonProcess, unique
from .test_cli import Ctl

pytestmark = pytest.mark.timeout(120)


def test_telemetry_sign_then_verify_once(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """`telemetry sign` output feeds `telemetry verify`: exit 0 once, then EX_DATAERR (replay)."""
    ctl = Ctl(daemon, capsys)
    tenant = unique("ct")
    ctl.ok("keys", "create", f"{tenant}/telemetry")
    body = base64.b64encode(b'{"event": "x"}').decode()
    sig = ctl.json("telemetry", "sign", f"{tenant}/telemetry", "--data-b64", body)
    assert sig["kid"] == f"{tenant}.telemetry.v1"
    argv = ["telemetry", "verify", "--tenant", tenant, "--kid", sig["kid"], "--timestamp",
            sig["timestamp"], f"--nonce={sig['nonce']}", "--signature", sig["signature"],
            "--data-b64", body]  # fmt: skip
    assert "valid: " in ctl.ok(*argv)
    code, _, err = ctl(*argv)
    assert code == os.EX_DATAERR
    assert "replayed_nonce" in err
    tampered = base64.b64encode(b'{"event": "y"}').decode()
    code, _, err = ctl(*argv[:-1], tampered)
    assert (code, "invalid_signature" in err) == (os.EX_DATAERR, True)


def test_feedback_sign_then_verify(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """`feedback sign` prints an envelope that `feedback verify` accepts for its schema only."""
    ctl = Ctl(daemon, capsys)
    tenant = unique("cf")
    ctl.ok("keys", "create", f"{tenant}/feedback")
    data = tmp_path / "data.json"
    data.write_text('{"accepted": true, "score": 1.5}')
    envelope = json.loads(ctl.ok("feedback", "sign", f"{tenant}/feedback", "--schema", "s.v1",
                                 "--data-file", str(data)))  # fmt: skip
    assert envelope["data"] == {"accepted": True, "score": 1.5}
    env_file = tmp_path / "envelope.json"
    env_file.write_text(json.dumps(envelope))
    code, _, err = ctl("feedback", "verify", "--schema", "s.v2", "--envelope-file", str(env_file))
    assert (code, "schema_mismatch" in err) == (os.EX_DATAERR, True)
    assert "valid: " in ctl.ok(
        "feedback", "verify", "--schema", "s.v1", "--envelope-file", str(env_file)
    )
    data.write_text('{"a": 1, "a": 2}')
    code, _, err = ctl("feedback", "sign", f"{tenant}/feedback", "--schema", "s.v1",
                       "--data-file", str(data))  # fmt: skip
    assert (code, "malformed_json" in err) == (os.EX_PROTOCOL, True)
