"""signerctl against a real signerd on a real SoftHSM token: output, exit codes, no data leaks."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signerd import errors
from signerd.cli import EXIT_FOR_CODE, main
from signerd.wire import from_jwk

from ..conftest import ROOT, DaemonProcess, start_daemon, unique


class Ctl:
    """signerctl in-process against one daemon: exit code, stdout, stderr."""

    def __init__(self, daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> None:
        self.socket = str(daemon.socket_path)
        self.capsys = capsys

    def __call__(self, *argv: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--socket", self.socket, "--timeout", "30", *argv])
        out, err = self.capsys.readouterr()
        return code, out, err

    def ok(self, *argv: str) -> str:
        code, out, err = self(*argv)
        assert code == os.EX_OK, err
        assert err == ""
        return out

    def json(self, *argv: str) -> Any:
        return json.loads(self.ok("--json", *argv))


def run_ctl(
    *argv: str, stdin: bytes | int | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """signerctl as its own process, for stdin, the environment and the exit status."""
    full_env = {**os.environ, **(env or {})}
    kwargs: dict[str, Any] = {"stdin": stdin} if isinstance(stdin, int) else {"input": stdin}
    return subprocess.run(
        [sys.executable, "-m", "signerd.cli", *argv],
        capture_output=True,
        env=full_env,
        cwd=str(ROOT),
        timeout=60,
        check=False,
        **kwargs,
    )


@pytest.fixture
def ctl(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(daemon, capsys)


@pytest.fixture
def key(ctl: Ctl) -> str:
    name = f"{unique('ctl')}/feedback"
    ctl.ok("keys", "create", name)
    return name


def kid_of(key: str, version: int) -> str:
    tenant, name = key.split("/")
    return f"{tenant}.{name}.v{version}"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_every_wire_code_has_an_exit_code() -> None:
    """The exit-code table covers exactly the closed set of wire codes."""
    assert set(EXIT_FOR_CODE) == set(errors.CODES)
    assert set(EXIT_FOR_CODE.values()) <= {
        os.EX_DATAERR, os.EX_NOINPUT, os.EX_UNAVAILABLE, os.EX_SOFTWARE, os.EX_CANTCREAT,
        os.EX_TEMPFAIL, os.EX_PROTOCOL, os.EX_NOPERM,
    }  # fmt: skip


def test_operator_lifecycle(ctl: Ctl, key: str) -> None:
    """create, show, sign, rotate, retire, destroy and kid, with the exit code of each refusal."""
    out = ctl.ok("keys", "show", key)
    assert kid_of(key, 1) in out and "active" in out
    signed = ctl.json("sign", key, "--data-b64", b64(b"hello"))
    assert signed["kid"] == kid_of(key, 1) and len(base64.b64decode(signed["signature"])) == 64
    assert "valid: " + kid_of(key, 1) in ctl.ok(
        "verify", kid_of(key, 1), "--signature", signed["signature"], "--data-b64", b64(b"hello")
    )
    out = ctl.ok("keys", "rotate", key)
    assert f"new active kid: {kid_of(key, 2)}" in out
    rotated = ctl.json("keys", "rotate", key, "--pending")
    assert rotated["kid"] == kid_of(key, 3)
    assert [v["state"] for v in rotated["key"]["versions"]] == ["verify-only", "active", "pending"]
    assert ctl.json("keys", "promote", key, "3")["active_kid"] == kid_of(key, 3)
    ctl.ok("keys", "retire", key, "1")
    code, out, err = ctl(
        "verify", kid_of(key, 1), "--signature", signed["signature"], "--data-b64", b64(b"hello")
    )
    assert code == os.EX_DATAERR and out == ""
    assert err.startswith("signerctl: retired_kid: ") and "(request " in err
    code, _, err = ctl("keys", "destroy", key, "1", "--now", "--confirm", kid_of(key, 2))
    assert code == os.EX_DATAERR and "confirmation_required" in err
    ctl.ok("keys", "destroy", key, "1", "--now", "--confirm", kid_of(key, 1))
    code, _, err = ctl(
        "verify", kid_of(key, 1), "--signature", signed["signature"], "--data-b64", b64(b"hello")
    )
    assert code == os.EX_DATAERR and "destroyed_kid" in err
    info = ctl.json("kid", kid_of(key, 1))
    assert info["state"] == "destroyed" and info["version"] == 1
    assert "-----BEGIN PUBLIC KEY-----" in ctl.ok("kid", kid_of(key, 1))


def test_promote_pending_finds_the_version_by_state(ctl: Ctl, key: str) -> None:
    """keys promote --pending promotes the one pending version; none or several is a clear error."""
    code, out, err = ctl("keys", "promote", key, "--pending")
    assert (code, out) == (os.EX_NOINPUT, "")
    assert err == f"signerctl: no_pending_version: {key} has no pending version\n"
    quiet = ctl.json("keys", "promote", key, "--pending", "--if-any")
    assert quiet["active_kid"] == kid_of(key, 1)
    assert "nothing promoted" in ctl.ok("keys", "promote", key, "--pending", "--if-any")
    ctl.ok("keys", "rotate", key, "--pending")
    promoted = ctl.json("keys", "promote", key, "--pending")
    assert promoted["active_kid"] == kid_of(key, 2)
    assert [v["state"] for v in promoted["versions"]] == ["verify-only", "active"]
    ctl.ok("keys", "rotate", key, "--pending")
    assert ctl.json("keys", "promote", key, "--pending", "--if-any")["active_kid"] == kid_of(key, 3)
    ctl.ok("keys", "rotate", key, "--pending")
    ctl.ok("keys", "rotate", key, "--pending")
    code, out, err = ctl("keys", "promote", key, "--pending", "--if-any")
    assert (code, out) == (os.EX_DATAERR, "")
    assert err.startswith("signerctl: ambiguous_pending: ") and "(4, 5)" in err
    assert ctl.json("keys", "show", key)["active_kid"] == kid_of(key, 3)


def test_staged_rotation_sequence(ctl: Ctl, key: str) -> None:
    """The staged unit's two commands, run twice: each run promotes the previous run's version."""
    for run in (1, 2):
        ctl.ok("keys", "promote", key, "--pending", "--if-any")
        published = ctl.json("keys", "rotate", key, "--pending")
        assert published["kid"] == kid_of(key, run + 1)
        assert published["key"]["active_kid"] == kid_of(key, run)


@pytest.mark.parametrize(
    ("argv", "exit_code", "code"),
    [
        (["keys", "show", "{tenant}/absent"], os.EX_NOINPUT, "unknown_key"),
        (["keys", "create", "{key}"], os.EX_CANTCREAT, "key_exists"),
        (["keys", "create", "Bad/Name"], os.EX_DATAERR, "invalid_key_name"),
        (["keys", "retire", "{key}", "1"], os.EX_DATAERR, "invalid_state"),
        (["keys", "promote", "{key}", "9"], os.EX_NOINPUT, "unknown_version"),
        (["sign", "{tenant}/absent", "--data-b64", "aGk="], os.EX_NOINPUT, "unknown_key"),
        (["sign", "{key}", "--data-b64", "not base64!"], os.EX_DATAERR, "invalid_base64"),
        (
            ["verify", "{kid}", "--signature", "{zero}", "--data-b64", "aGk="],
            os.EX_DATAERR,
            "invalid_signature",
        ),
        (
            ["verify", "{tenant}.x.v1", "--signature", "{zero}", "--data-b64", "aGk="],
            os.EX_DATAERR,
            "unknown_kid",
        ),
        (["sign", "{key}", "--data-file", "/nonexistent/data"], os.EX_NOINPUT, "no_input"),
        (["kid", "not-a-kid"], os.EX_NOINPUT, "unknown_kid"),
        (["kid", "{tenant}.absent.v1"], os.EX_NOINPUT, "unknown_kid"),
    ],
)
def test_refusals_map_to_sysexits(
    ctl: Ctl, key: str, argv: list[str], exit_code: int, code: str
) -> None:
    """Each refusal exits with its sysexits code and names its error code on stderr."""
    tenant = key.split("/")[0]
    fill = {"key": key, "tenant": tenant, "kid": kid_of(key, 1), "zero": b64(bytes(64))}
    filled = [a.format(**fill) for a in argv]
    got, out, err = ctl(*filled)
    assert (got, out) == (exit_code, "")
    assert err.startswith(f"signerctl: {code}: "), err


def test_json_error_envelope_on_stdout(ctl: Ctl, key: str) -> None:
    """With --json an error also prints the error envelope on stdout."""
    code, out, err = ctl("--json", "keys", "show", f"{key}-absent")
    assert code == os.EX_NOINPUT
    envelope = json.loads(out)["error"]
    assert envelope["code"] == "unknown_key" and envelope["request_id"]
    assert envelope["request_id"] in err


def test_unreachable_daemon_is_unavailable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No daemon behind --socket exits EX_UNAVAILABLE with connection_failed."""
    code = main(["--socket", str(tmp_path / "none.sock"), "health"])
    assert code == os.EX_UNAVAILABLE
    assert capsys.readouterr().err.startswith("signerctl: connection_failed: ")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["keys"],
        ["keys", "promote", "a/b", "one"],
        ["keys", "promote", "a/b"],
        ["keys", "promote", "a/b", "2", "--pending"],
        ["keys", "promote", "a/b", "2", "--if-any"],
        ["keys", "destroy", "a/b", "1", "--now"],
        ["--timeout", "0", "health"],
        ["sign", "a/b", "--data-file", "f", "--data-b64", "aGk="],
        ["verify", "a.b.v1"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_exit_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Missing or malformed arguments exit EX_USAGE without contacting anything."""
    assert main(argv) == os.EX_USAGE
    assert "usage:" in capsys.readouterr().err


def test_sign_and_verify_from_stdin_never_echo_the_data(daemon: DaemonProcess, key: str) -> None:
    """Data piped on stdin is signed and verified; neither output carries it."""
    secret = b"customer-4711 card 4111111111111111"
    env = {"SIGNERD_SOCKET": str(daemon.socket_path)}
    signed = run_ctl("--json", "sign", key, stdin=secret, env=env)
    assert signed.returncode == os.EX_OK, signed.stderr
    sig = json.loads(signed.stdout)["signature"]
    verified = run_ctl("verify", kid_of(key, 1), "--signature", sig, stdin=secret, env=env)
    assert verified.returncode == os.EX_OK, verified.stderr
    refused = run_ctl("verify", kid_of(key, 1), "--signature", sig, stdin=secret + b"!", env=env)
    assert refused.returncode == os.EX_DATAERR
    for proc in (signed, verified, refused):
        for needle in (secret, b64(secret).encode(), b"4111111111111111"):
            assert needle not in proc.stdout + proc.stderr


def test_data_file_and_env_socket(daemon: DaemonProcess, key: str, tmp_path: Path) -> None:
    """--data-file signs a file's bytes; the socket comes from $SIGNERD_SOCKET."""
    data = tmp_path / "payload.bin"
    data.write_bytes(bytes(range(256)))
    env = {"SIGNERD_SOCKET": str(daemon.socket_path)}
    signed = run_ctl("--json", "sign", key, "--data-file", str(data), env=env)
    assert signed.returncode == os.EX_OK, signed.stderr
    sig = json.loads(signed.stdout)
    checked = run_ctl(
        "--json",
        "verify",
        sig["kid"],
        "--signature",
        sig["signature"],
        "--data-file",
        str(data),
        env=env,
    )
    assert checked.returncode == os.EX_OK
    assert json.loads(checked.stdout) == {"kid": sig["kid"], "key": key, "state": "active"}


def test_no_data_on_a_terminal_is_a_usage_error(daemon: DaemonProcess, key: str) -> None:
    """sign with no data option and a terminal on stdin exits EX_USAGE instead of waiting."""
    master, slave = os.openpty()
    try:
        proc = run_ctl("--socket", str(daemon.socket_path), "sign", key, stdin=slave)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == os.EX_USAGE
    assert b"no data" in proc.stderr


def test_json_jwks_is_a_jwks_document(ctl: Ctl, key: str) -> None:
    """--json jwks prints a JWKS whose keys parse as Ed25519 OKP JWKs of the tenant."""
    doc = ctl.json("jwks", "--tenant", key.split("/")[0])
    assert [from_jwk(j)[0] for j in doc["keys"]] == [kid_of(key, 1)]
    assert kid_of(key, 1) in ctl.ok("jwks", "--tenant", key.split("/")[0])


def test_list_health_ready(ctl: Ctl, key: str) -> None:
    """keys list shows the tenant's keys; health and ready answer."""
    tenant = key.split("/")[0]
    out = ctl.ok("keys", "list", "--tenant", tenant)
    assert key in out and kid_of(key, 1) in out
    assert [k["key"] for k in ctl.json("keys", "list", "--tenant", tenant)["keys"]] == [key]
    assert ctl.ok("health").strip() == "ok"
    assert ctl.json("ready") == {"status": "ready"}


def test_audit_verify_checks_the_daemon_trail(
    ctl: Ctl, daemon: DaemonProcess, key: str, tmp_path: Path
) -> None:
    """audit verify passes the daemon's own trail and fails a copy with one record altered."""
    ctl.ok("sign", key, "--data-b64", b64(b"audited"))
    report = ctl.json("audit", "verify", str(daemon.audit_path.parent))
    assert report["ok"] is True and report["records"] > 0
    longest = max(daemon.audit_files(), key=lambda p: len(p.read_bytes().splitlines()))
    lines = longest.read_text().splitlines()
    assert len(lines) >= 2
    record = json.loads(lines[1])
    record["outcome"] = "tampered" if record.get("outcome") != "tampered" else "ok"
    lines[1] = json.dumps(record)
    forged = tmp_path / "forged.jsonl"
    forged.write_text("\n".join(lines) + "\n")
    code, out, _ = ctl("audit", "verify", str(forged))
    assert code == os.EX_DATAERR
    assert "broken at line" in out
    code, _, err = ctl("audit", "verify", str(tmp_path / "missing.jsonl"))
    assert code == os.EX_NOINPUT and err.startswith("signerctl: no_input: ")


def test_input_limit_is_the_daemon_default_body_limit() -> None:
    """signerctl's data limit is signerd's default server.max_body_bytes (1 MiB)."""
    from signerd._files import MAX_INPUT_BYTES
    from signerd.server import Limits

    assert MAX_INPUT_BYTES == Limits().max_body_bytes == 1 << 20


@pytest.mark.parametrize(
    "argv",
    [
        ["sign", "KEY", "--data-file", "/dev/zero"],
        ["verify", "KID", "--signature", "AAAA", "--data-file", "/dev/urandom"],
        ["telemetry", "sign", "KEY", "--data-file", "/dev/zero"],
        ["feedback", "verify", "--schema", "s", "--envelope-file", "/dev/zero"],
        ["audit", "verify", "--anchor", "/dev/urandom", "TRAIL"],
        ["audit", "verify", "/dev/urandom"],
        ["audit", "payload-hash", "--key", "/dev/urandom", "--sha256", "0" * 64],
        ["sign", "KEY", "--data-file", "FIFO"],
        ["audit", "verify", "--anchor", "FIFO", "TRAIL"],
        ["audit", "payload-hash", "--key", "FIFO", "--sha256", "0" * 64],
    ],
)
def test_a_device_or_fifo_where_a_file_is_expected_is_refused_unread(
    daemon: DaemonProcess, key: str, tmp_path: Path, argv: list[str]
) -> None:
    """A device or a FIFO nobody writes to, given as a file, exits 66 not_a_file at once."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    trail = tmp_path / "audit.jsonl"
    trail.write_bytes(b"")
    names = {"KEY": key, "KID": kid_of(key, 1), "FIFO": str(fifo), "TRAIL": str(trail)}
    argv = [names.get(a, a) for a in argv]
    proc = run_ctl("--socket", str(daemon.socket_path), *argv, stdin=b"")
    assert proc.returncode == os.EX_NOINPUT, proc.stderr
    assert proc.stderr.startswith(b"signerctl: not_a_file: "), proc.stderr
    assert b"not a regular file" in proc.stderr and b"Traceback" not in proc.stderr


def test_data_is_read_up_to_the_limit_from_a_file_or_stdin(tmp_path: Path) -> None:
    """Data over 1 MiB, from a file or from an endless stdin, exits 65 input_too_large;
    exactly 1 MiB is read whole and signed (by a daemon whose body limit allows it)."""
    from signerd._files import MAX_INPUT_BYTES

    d = start_daemon(tmp_path / "d", server={"workers": 1, "max_body_bytes": 4 << 20})
    try:
        env = {"SIGNERD_SOCKET": str(d.socket_path)}
        key = f"{unique('big')}/k"
        assert run_ctl("keys", "create", key, env=env).returncode == os.EX_OK
        over = tmp_path / "over.bin"
        over.write_bytes(b"x" * (MAX_INPUT_BYTES + 1))
        with open("/dev/zero", "rb") as zero:
            endless = run_ctl("sign", key, stdin=zero.fileno(), env=env)
        for proc in (
            run_ctl("sign", key, "--data-file", str(over), env=env),
            run_ctl("sign", key, "--data-file", "-", stdin=over.read_bytes(), env=env),
            endless,
        ):
            assert proc.returncode == os.EX_DATAERR, proc.stderr
            assert proc.stderr.startswith(b"signerctl: input_too_large: "), proc.stderr
            assert b"more than 1048576 bytes" in proc.stderr
        exact = tmp_path / "exact.bin"
        exact.write_bytes(b"x" * MAX_INPUT_BYTES)
        signed = run_ctl("--json", "sign", key, "--data-file", str(exact), env=env)
        assert signed.returncode == os.EX_OK, signed.stderr
        sig = json.loads(signed.stdout)["signature"]
        checked = run_ctl(
            "verify", kid_of(key, 1), "--signature", sig, stdin=exact.read_bytes(), env=env
        )
        assert checked.returncode == os.EX_OK, checked.stderr
    finally:
        assert d.stop() == 0, d.log_text()


def test_admin_commands_send_an_idempotency_key(ctl: Ctl, daemon: DaemonProcess) -> None:
    """signerctl's create and rotate go out with an Idempotency-Key each (the daemon stores
    one answer per command), so the client may resend them safely."""
    import sqlite3

    key = f"{unique('ctlidem')}/k"
    ctl.ok("keys", "create", key)
    ctl.ok("keys", "rotate", key)
    db = sqlite3.connect(str(daemon.socket_path.parent / ".signerd-idempotency.db"), timeout=5)
    try:
        rows = db.execute(
            "SELECT kind, status, kid FROM entries WHERE target = ? ORDER BY created",
            (f"key {key}",),
        ).fetchall()
    finally:
        db.close()
    assert rows == [("create", 201, kid_of(key, 1)), ("rotate", 200, kid_of(key, 2))]
