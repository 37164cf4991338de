"""One time format: Unix seconds (UTC) in every answer, in the audit trail, and in openapi.json."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT, DaemonProcess, unique, wait_until
from ..support.federation import Api, Producer, b64, federation_daemon

DOC = json.loads((ROOT / "signerd" / "openapi.json").read_text())
_DECIMAL_SECONDS = "^(0|[1-9][0-9]{0,11})$"


def _time_properties() -> list[tuple[str, str, dict[str, Any]]]:
    found = []
    for name, schema in DOC["components"]["schemas"].items():
        for prop, spec in schema.get("properties", {}).items():
            if prop.endswith("_at") or prop in ("time", "timestamp", "ts"):
                found.append((name, prop, spec))
    return found


def test_openapi_states_unix_seconds_for_every_time() -> None:
    """openapi.json says Unix seconds for every time field: integers, or decimal strings in signed inputs."""
    assert "Unix seconds, UTC" in DOC["info"]["description"]
    props = _time_properties()
    assert {p for _, p, _ in props} == {
        "created_at",
        "added_at",
        "retired_at",
        "timestamp",
        "signed_at",
        "started_at",
        "state_changed_at",
        "deletion_at",
    }
    for name, prop, spec in props:
        assert "Unix seconds" in spec.get("description", ""), (name, prop)
        if spec["type"] == "string":
            assert spec["pattern"] == _DECIMAL_SECONDS, (name, prop)
        else:
            assert spec["type"] in ("integer", ["integer", "null"]), (name, prop)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = federation_daemon(tmp_path_factory.mktemp("times"))
    yield d
    assert d.stop() == 0, d.log_text()


def _near_now(value: object) -> bool:
    return type(value) is int and abs(value - time.time()) < 120


def test_answers_and_audit_records_carry_integer_unix_seconds(fed: DaemonProcess) -> None:
    """created_at, added_at, retired_at, telemetry timestamps and audit record times are Unix seconds."""
    api = Api(fed)
    tenant = unique("tm")
    created = api.ok("POST", "/v1/keys", {"key": f"{tenant}/telemetry"}, status=201)
    assert all(_near_now(v["created_at"]) for v in created["versions"]), created
    listed = api.ok("GET", f"/v1/keys/{tenant}/telemetry")
    assert all(_near_now(v["created_at"]) for v in listed["versions"]), listed
    p = Producer.new("p-times")
    added = api.ok(
        "POST", "/v1/trusted-keys", {"tenant": tenant, "kid": p.kid, "jwk": p.jwk()}, status=201
    )
    assert _near_now(added["added_at"]) and added["retired_at"] is None, added
    retired = api.ok("POST", f"/v1/trusted-keys/{tenant}/{p.kid}/retire")
    assert _near_now(retired["retired_at"]) and retired["added_at"] == added["added_at"]
    signed = api.ok(
        "POST", "/v1/telemetry/sign", {"key": f"{tenant}/telemetry", "body": b64(b"{}")}
    )
    assert re.fullmatch(_DECIMAL_SECONDS, signed["timestamp"])
    assert _near_now(int(signed["timestamp"]))

    def mine() -> list[dict[str, Any]]:
        return [r for r in fed.audit_records() if r.get("tenant") == tenant]

    def enough() -> list[dict[str, Any]]:
        found = mine()
        return found if len(found) >= 4 else []

    records = wait_until(enough, what="the test's audit records")
    assert all(_near_now(r["time"]) and "ts" not in r for r in records), records


def test_trusted_key_files_with_fractional_times_are_read_as_seconds(tmp_path: Path) -> None:
    """A trusted-keys file written with fractional times is read back as integer seconds."""
    from signerd.federation._trust import TrustedKeys

    p = Producer.new("p-old")
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    record = {
        "tenant": "acme",
        "kid": p.kid,
        "x": p.jwk()["x"],
        "state": "retired",
        "added_at": 1795000000.123,
        "retired_at": 1795000100.9,
    }
    (state / "trusted-keys.json").write_text(json.dumps({"keys": [record]}))
    (key,) = TrustedKeys(str(state), ()).list("acme")
    assert (key.added_at, key.retired_at) == (1795000000, 1795000100)
    assert key.to_json()["added_at"] == 1795000000
