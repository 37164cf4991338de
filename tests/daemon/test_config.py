"""Configuration: the example parses, and every validation error names its key."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from signerd._config import ConfigError, load, parse

from ..conftest import daemon_config, to_toml

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict[str, Any]:
    return {
        "server": {"socket": "/tmp/x.sock"},
        "backends": {"hsm": {"type": "pkcs11"}},
        "audit": {"path": "/tmp/a.jsonl"},
    }


def test_example_configuration_parses() -> None:
    """config/signerd.example.toml is valid and routes tenants to their backend."""
    config = load(str(ROOT / "config" / "signerd.example.toml"))
    assert config.default_backend == "hsm"
    assert config.tenant_backends == {"globex": "vault"}
    assert config.socket_mode == 0o660
    assert [str(k) for k in config.bootstrap] == ["acme/telemetry-ingest", "acme/feedback"]
    assert config.jwk_alg == "Ed25519"  # RFC 9864's name, the default
    limits = config.limits  # the documented defaults for callers no rule names
    assert (limits.max_connections_stranger, limits.max_connections_strangers) == (4, 64)


def test_relative_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    """socket, audit.path and *_file keys resolve against the configuration's directory."""
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nsocket = "run/s.sock"\n[backends.hsm]\ntype = "pkcs11"\npin_file = "pin"\n'
        '[audit]\npath = "log/a.jsonl"\n'
    )
    config = load(str(path))
    assert config.socket == str(tmp_path / "run" / "s.sock")
    assert config.backends["hsm"]["pin_file"] == str(tmp_path / "pin")
    assert config.audit["path"] == str(tmp_path / "log" / "a.jsonl")


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d.update(nonsense=1), "nonsense"),
        (lambda d: d["server"].update(socket_mode="0666"), "server.socket_mode"),
        (lambda d: d["server"].update(socket_mode="rw"), "server.socket_mode"),
        (lambda d: d["server"].update(max_body_bytes=0), "server.max_body_bytes"),
        (lambda d: d["server"].update(log_level="loud"), "server.log_level"),
        (lambda d: d["server"].update(colour="blue"), "server.colour"),
        (lambda d: d["server"].update(on_loop="yes"), "server.on_loop"),
        (lambda d: d["server"].update(jwk_alg="ES256"), "server.jwk_alg"),
        (lambda d: d["server"].update(jwk_alg="eddsa"), "server.jwk_alg"),
        (lambda d: d["server"].update(event_loop="trio"), "server.event_loop"),
        (lambda d: d["server"].update(event_loop=1), "server.event_loop"),
        (
            lambda d: d["server"].update(max_connections_stranger=0),
            "server.max_connections_stranger",
        ),
        (
            lambda d: d["server"].update(max_connections=100, max_connections_strangers=51),
            "server.max_connections_strangers",
        ),
        (lambda d: d.update(keys={"backend_timeout": "soon"}), "keys.backend_timeout"),
        (lambda d: d.update(keys={"default_backend": "nope"}), "keys.default_backend"),
        (lambda d: d.update(keys={"bootstrap": ["Bad Name"]}), "keys.bootstrap[0]"),
        (lambda d: d.update(keys={"max_batch": 0}), "keys.max_batch"),
        (lambda d: d.update(backends={}), "backends"),
        (lambda d: d["backends"].update(x={"module": "m"}), "backends.x.type"),
        (lambda d: d.update(tenants={"acme": {"backend": "nope"}}), "tenants.acme.backend"),
        (lambda d: d.update(audit={}), "audit.path"),
        (lambda d: d.update(keys={"max_active_age": 90}), "keys.max_active_age"),
        (lambda d: d.update(keys={"max_active_age": {"acme": 1.0}}), "keys.max_active_age.acme"),
        (lambda d: d.update(keys={"max_active_age": {"a/B": 1.0}}), "keys.max_active_age.a/B"),
        (lambda d: d.update(keys={"max_active_age": {"a/*": 0}}), "keys.max_active_age.a/*"),
        (lambda d: d.update(keys={"max_active_age": {"a/*": "9d"}}), "keys.max_active_age.a/*"),
        (
            lambda d: d.update(keys={"max_active_age": {f"a/k{i}": 1.0 for i in range(65)}}),
            "keys.max_active_age",
        ),
        (lambda d: d.update(keys={"deletion_wait": -1}), "keys.deletion_wait"),
        (lambda d: d.update(keys={"deletion_wait": float("nan")}), "keys.deletion_wait"),
        (lambda d: d.update(keys={"deletion_wait": float("inf")}), "keys.deletion_wait"),
        (lambda d: d.update(keys={"deletion_wait": "7d"}), "keys.deletion_wait"),
        (lambda d: d.update(metrics={"enabled": "yes"}), "metrics.enabled"),
        (lambda d: d.update(metrics={"max_key_series": 0}), "metrics.max_key_series"),
        (lambda d: d.update(metrics={"series": 1}), "metrics.series"),
    ],
)
def test_errors_name_the_key(change: Any, named: str) -> None:
    """A wrong value is a ConfigError whose message starts with the key's path."""
    doc = _base()
    change(doc)
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert str(info.value).startswith(named), str(info.value)


def test_max_active_age_keeps_the_order_of_the_file() -> None:
    """keys.max_active_age: patterns to seconds, in the file's order (the first match wins)."""
    doc = _base()
    doc["keys"] = {"max_active_age": {"acme/tel-*": 86400, "*/*": 7776000.0}}
    config = parse(doc)
    assert config.settings.max_active_age == (("acme/tel-*", 86400.0), ("*/*", 7776000.0))
    assert (config.metrics, config.max_key_series) == (True, 1000)


def test_deletion_wait_defaults_to_seven_days_and_takes_zero_when_written() -> None:
    """keys.deletion_wait: 7 days unless set; 0 is allowed only when written out."""
    assert parse(_base()).settings.deletion_wait == 7 * 86400
    doc = _base()
    doc["keys"] = {"deletion_wait": 0}
    assert parse(doc).settings.deletion_wait == 0.0


def test_unreadable_or_invalid_file(tmp_path: Path) -> None:
    """A missing file or broken TOML is a ConfigError that names the file."""
    with pytest.raises(ConfigError, match="cannot read"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load(str(bad))


def _check(base: Path, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    """``signerd --check`` on ``doc``, written to ``base/signerd.toml``."""
    config = base / "signerd.toml"
    config.write_text(to_toml(doc))
    return subprocess.run(
        [sys.executable, "-m", "signerd", "--config", str(config), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _created(base: Path) -> list[str]:
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.name != "signerd.toml")


def test_check_accepts_a_good_configuration_and_creates_nothing(tmp_path: Path) -> None:
    """signerd --check on a valid configuration exits 0 and creates no directory or file."""
    doc = daemon_config(tmp_path, federation={"state_dir": str(tmp_path / "federation")})
    result = _check(tmp_path, doc)
    assert result.returncode == os.EX_OK, result.stderr
    assert result.stdout.strip().endswith(": ok")
    assert _created(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda d: d["backends"]["hsm"].update(pin_flie="/x"), "backends.hsm.pin_flie"),
        (lambda d: d["audit"].update(fsyncc=False), "fsyncc"),
    ],
)
def test_check_names_a_misspelt_key_and_creates_nothing(
    tmp_path: Path, change: Callable[[dict[str, Any]], None], named: str
) -> None:
    """signerd --check exits 78 naming a misspelt backend or audit key, and creates nothing."""
    doc = daemon_config(tmp_path)
    change(doc)
    result = _check(tmp_path, doc)
    assert result.returncode == os.EX_CONFIG, result.stderr
    assert "configuration error" in result.stderr and named in result.stderr, result.stderr
    assert _created(tmp_path) == []
