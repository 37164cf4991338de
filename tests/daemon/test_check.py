"""``signerd --check``: backends logged in, credentials resolved, every error reported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from signerd.daemon._check import _environment
from signerd.daemon._unit import UnitView, parse_unit

from ..conftest import ROOT, daemon_config, pkcs11_backend_config, to_toml
from ..support.openbao import BaoServer, vault_backend_config

PREFIX = "signerd: "


def _run(
    base: Path, doc: dict[str, Any], *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    config = base / "signerd.toml"
    config.write_text(to_toml(doc))
    environ = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    return subprocess.run(
        [sys.executable, "-m", "signerd", "--config", str(config), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        env={**environ, **(env or {})},
    )


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [
        line.removeprefix(PREFIX)
        for line in result.stderr.splitlines()
        if line.startswith(PREFIX) and not line.endswith("error(s)")
    ]


def _wrong_pin_file(base: Path) -> str:
    path = base / "wrong-pin"
    path.write_text("0000-wrong\n")
    return str(path)


def test_check_reports_every_error_not_only_the_first(tmp_path: Path) -> None:
    """One run lists unknown policy users and groups, each unreadable federation key, an
    unsafe socket directory and a refused PIN, exits 78 and creates nothing."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    hsm = {**pkcs11_backend_config(), "pin_file": _wrong_pin_file(tmp_path)}
    doc = daemon_config(
        tmp_path,
        backends={"hsm": hsm},
        policy={
            "rules": [
                {"name": "a", "users": ["no-such-user-1a"], "operations": ["sign"]},
                {"name": "b", "groups": ["no-such-group-2b"], "operations": ["sign"]},
            ]
        },
        federation={
            "state_dir": str(tmp_path / "fed"),
            "trusted_keys": [
                {"tenant": "acme", "kid": "k1", "jwk_file": "missing-one.jwk"},
                {"tenant": "acme", "kid": "k2", "pem_file": "missing-two.pem"},
            ],
        },
    )
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _run(tmp_path, doc, "--check")
    assert result.returncode == os.EX_CONFIG, result.stderr
    errors = _errors(result)
    expected = [
        "policy.rules[0].users: unknown user 'no-such-user-1a'",
        "policy.rules[1].groups: unknown group 'no-such-group-2b'",
        "federation.trusted_keys[0].jwk_file: cannot read",
        "federation.trusted_keys[1].pem_file: cannot read",
        f"socket directory is writable by other users: {run_dir}",
        "the token refused the login (PinIncorrect)",
    ]
    for part in expected:
        assert sum(part in line for line in errors) == 1, (part, errors)
    assert f"{len(errors)} error(s)" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "signerd.toml"])


def test_check_gives_the_daemons_own_line_for_a_wrong_pin(tmp_path: Path) -> None:
    """A refused PIN fails the check with exit 78 and the very line the daemon prints at start."""
    hsm = {**pkcs11_backend_config(), "pin_file": _wrong_pin_file(tmp_path)}
    doc = daemon_config(tmp_path, backends={"hsm": hsm})
    daemon = _run(tmp_path, doc)
    assert daemon.returncode == os.EX_CONFIG, daemon.stderr
    said = [line for line in daemon.stderr.splitlines() if "configuration error" in line]
    assert len(said) == 1 and "PinIncorrect" in said[0], daemon.stderr
    check = _run(tmp_path, doc, "--check")
    assert check.returncode == os.EX_CONFIG
    assert _errors(check) == [said[0].removeprefix(PREFIX) + " [backends.hsm]"], check.stderr


def test_check_gives_the_daemons_own_line_for_a_refused_vault_token(
    tmp_path: Path, openbao_dev: BaoServer
) -> None:
    """A Vault token the server refuses fails the check with exit 78 and the daemon's line."""
    vault = vault_backend_config(openbao_dev, token="s.not-a-token-at-all")
    doc = daemon_config(tmp_path, keys={"default_backend": "vault"}, backends={"vault": vault})
    daemon = _run(tmp_path, doc)
    assert daemon.returncode == os.EX_CONFIG, daemon.stderr
    said = [line for line in daemon.stderr.splitlines() if "configuration error" in line]
    assert len(said) == 1, daemon.stderr
    check = _run(tmp_path, doc, "--check")
    assert check.returncode == os.EX_CONFIG
    assert _errors(check) == [said[0].removeprefix(PREFIX) + " [backends.vault]"], check.stderr
    good = daemon_config(
        tmp_path,
        keys={"default_backend": "vault"},
        backends={"vault": vault_backend_config(openbao_dev)},
    )
    passed = _run(tmp_path, good, "--check")
    assert passed.returncode == os.EX_OK, passed.stderr


def test_check_resolves_credentials_from_a_directory(tmp_path: Path) -> None:
    """credential:pin resolves through --credentials-dir or $CREDENTIALS_DIRECTORY; without
    either the check fails naming the credential, and a wrong credential PIN is refused."""
    creds = tmp_path / "creds"
    creds.mkdir(mode=0o700)
    pin = Path(str(pkcs11_backend_config()["pin_file"])).read_text()
    (creds / "pin").write_text(pin)
    hsm = {**pkcs11_backend_config(), "pin_file": "credential:pin"}
    doc = daemon_config(tmp_path, backends={"hsm": hsm})
    missing = _run(tmp_path, doc, "--check")
    assert missing.returncode == os.EX_CONFIG
    assert "credential 'pin' needs $CREDENTIALS_DIRECTORY" in missing.stderr, missing.stderr
    by_flag = _run(tmp_path, doc, "--check", "--credentials-dir", str(creds))
    assert by_flag.returncode == os.EX_OK, by_flag.stderr
    by_env = _run(tmp_path, doc, "--check", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert by_env.returncode == os.EX_OK, by_env.stderr
    (creds / "pin").write_text("0000-wrong\n")
    wrong = _run(tmp_path, doc, "--check", "--credentials-dir", str(creds))
    assert wrong.returncode == os.EX_CONFIG
    assert any("PinIncorrect" in line for line in _errors(wrong)), wrong.stderr


def test_credentials_dir_is_refused_without_check(tmp_path: Path) -> None:
    """--credentials-dir outside --check is a usage error (exit 2); the daemon does not start."""
    result = _run(tmp_path, daemon_config(tmp_path), "--credentials-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--credentials-dir is used with --check only" in result.stderr
    assert not (tmp_path / "run").exists()


def test_unit_view_of_the_shipped_service() -> None:
    """The shipped unit gives --check its user, its environment and its credential files."""
    view = parse_unit((ROOT / "systemd" / "signerd.service").read_text())
    assert view.user == "signerd"
    assert view.environment["SOFTHSM2_CONF"] == "/var/lib/signerd/softhsm/softhsm2.conf"
    assert view.credentials == {"pin": "/etc/signerd/credentials/pin"}


def test_unit_view_follows_drop_ins_in_order() -> None:
    """A drop-in's later LoadCredential=, Environment= and User= lines win; an empty one resets."""
    text = (
        "# /usr/lib/systemd/system/signerd.service\n[Service]\nUser=signerd\n"
        "LoadCredential=pin:/etc/signerd/credentials/pin\nEnvironment=A=1 'B=two words'\n"
        "# /etc/systemd/system/signerd.service.d/override.conf\n[Service]\nLoadCredential=\n"
        "LoadCredential=pin:/srv/pin\nUser=other\n[Install]\nUser=ignored\n"
    )
    view = parse_unit(text)
    assert view.user == "other"
    assert view.environment == {"A": "1", "B": "two words"}
    assert view.credentials == {"pin": "/srv/pin"}


def test_unit_environment_and_credentials_are_applied_for_the_check_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unit's Environment= fills only what the shell left unset, its LoadCredential= files
    appear in a private $CREDENTIALS_DIRECTORY, and all of it is undone after the check."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("SIGNERD_TEST_SET", "shell")
    monkeypatch.delenv("SIGNERD_TEST_UNSET", raising=False)
    secret = tmp_path / "pin"
    secret.write_text("1234\n")
    view = UnitView(
        environment={"SIGNERD_TEST_SET": "unit", "SIGNERD_TEST_UNSET": "unit"},
        credentials={"pin": str(secret)},
    )
    with _environment(None, view) as (owner, errors):
        assert owner == os.geteuid() and errors == []
        assert os.environ["SIGNERD_TEST_SET"] == "shell"
        assert os.environ["SIGNERD_TEST_UNSET"] == "unit"
        directory = Path(os.environ["CREDENTIALS_DIRECTORY"])
        assert (directory / "pin").read_text() == "1234\n"
        assert directory.stat().st_mode & 0o777 == 0o700
    assert "CREDENTIALS_DIRECTORY" not in os.environ and "SIGNERD_TEST_UNSET" not in os.environ
    assert not directory.exists()
