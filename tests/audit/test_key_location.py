"""Where the audit payload key lives by default: out of the log directory."""

from __future__ import annotations

import configparser
import os
import tomllib
from pathlib import Path

import pytest

from signerd.audit import audit_settings
from signerd.client import Client
from signerd.testing import start

from ..conftest import ROOT, daemon_config


def test_default_key_is_in_the_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under systemd ($STATE_DIRECTORY) the default audit.key is there, not beside the trail."""
    monkeypatch.setenv("STATE_DIRECTORY", f"{tmp_path}/state:{tmp_path}/other")
    s = audit_settings({"path": str(tmp_path / "log" / "audit.jsonl")})
    assert s.key == f"{tmp_path}/state/audit.key"


def test_default_key_without_state_directory_is_beside_the_trail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $STATE_DIRECTORY (a development run) the default audit.key is beside the trail."""
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    s = audit_settings({"path": str(tmp_path / "audit.jsonl")})
    assert s.key == f"{tmp_path}/audit.key"


def test_a_key_left_in_the_log_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An audit.key of an earlier version beside the trail is refused, not silently replaced."""
    (tmp_path / "log").mkdir()
    (tmp_path / "state").mkdir()
    old = tmp_path / "log" / "audit.key"
    old.write_text(os.urandom(32).hex())
    old.chmod(0o600)
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    trail = str(tmp_path / "log" / "audit.jsonl")
    with pytest.raises(ValueError, match=r"audit\.key: not set, .* move it there"):
        audit_settings({"path": trail})
    assert audit_settings({"path": trail, "key": str(old)}).key == str(old)  # named: kept
    old.rename(tmp_path / "state" / "audit.key")  # moved: the default finds it
    assert audit_settings({"path": trail}).key == str(tmp_path / "state" / "audit.key")


def test_shipped_configurations_keep_the_key_out_of_the_log_directory() -> None:
    """The packaged and example configurations put audit.key in /var/lib/signerd, which the
    unit's StateDirectory= and tmpfiles.d create 0700 for signerd."""
    for name in ("systemd/signerd.toml", "config/signerd.example.toml"):
        audit = tomllib.loads((ROOT / name).read_text())["audit"]
        assert audit["key"] == "/var/lib/signerd/audit.key", name
        assert os.path.dirname(audit["path"]) != os.path.dirname(audit["key"]), name
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((ROOT / "systemd/signerd.service").read_text())
    assert unit["Service"]["StateDirectory"] == "signerd"
    assert unit["Service"]["StateDirectoryMode"] == "0700"
    tmpfiles = (ROOT / "systemd/signerd.tmpfiles").read_text().splitlines()
    assert "d /var/lib/signerd 0700 signerd signerd -" in tmpfiles
    dev = (ROOT / "config/dev.toml.in").read_text()
    assert 'key = "@VAR@/audit.key"' in dev and 'path = "@VAR@/log/audit.jsonl"' in dev


def test_daemon_under_a_state_directory_creates_the_key_there(tmp_path: Path) -> None:
    """A daemon given $STATE_DIRECTORY writes its payload key there, none in the log directory."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    doc = daemon_config(tmp_path, server={"workers": 2})
    d = start(doc, tmp_path, env={**os.environ, "STATE_DIRECTORY": str(state)}, cwd=ROOT)
    try:
        with Client(str(d.socket_path)) as c:
            c.create_key("keyloc/k")
            c.sign("keyloc/k", b"x")
    finally:
        assert d.stop() == 0, d.log_text()
    assert (state / "audit.key").stat().st_mode & 0o077 == 0
    assert not (tmp_path / "audit" / "audit.key").exists()
    assert list((tmp_path / "audit").glob("audit.w*.jsonl"))
