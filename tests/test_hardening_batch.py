"""Batch sign refusals are visible: each refused item's code is audited; all refused for permission is 403.

The caller is ``nobody``, granted sign on one tenant only; the keys live in
that tenant and in another one.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import DaemonProcess, policy_allow_all, start_daemon, unique
from .test_hardening_amplification import as_stranger, http_post

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def setup() -> Iterator[tuple[DaemonProcess, str, str]]:
    base = Path(tempfile.mkdtemp(prefix="signerd-batch-", dir="/tmp"))
    base.chmod(0o755)
    mine, other = unique("mine"), unique("othr")
    policy: dict[str, Any] = policy_allow_all()
    policy["rules"].append(
        {"name": "gw", "uids": [65534], "tenants": [mine], "operations": ["sign"]}
    )
    d = start_daemon(
        base / "d", server={"socket_group": "staff", "socket_mode": "0660"}, policy=policy
    )
    try:
        from signerd import Client

        with Client(d.socket_path) as admin:
            admin.create_key(f"{mine}/k")
            admin.create_key(f"{other}/k")
        yield d, mine, other
    finally:
        assert d.stop() == 0, d.log_text()[-2000:]
        shutil.rmtree(base, ignore_errors=True)


def _batch(keys: list[str]) -> bytes:
    data = base64.b64encode(b"payload").decode()
    return http_post(
        "/v1/sign", json.dumps({"items": [{"key": k, "data": data} for k in keys]}).encode()
    )


def _last_record(d: DaemonProcess) -> dict[str, Any]:
    lines = d.audit_records()
    record: dict[str, Any] = [r for r in lines if r["peer"]["uid"] == 65534][-1]
    return record


def test_batch_refused_for_permission_everywhere_is_403(
    setup: tuple[DaemonProcess, str, str],
) -> None:
    """Every item in another tenant: 403 permission_denied, audited with each item's code."""
    d, _, other = setup
    ((status, body, _),) = as_stranger(d, [_batch([f"{other}/k", f"{other}/k", f"{other}/nope"])])
    assert (status, json.loads(body)["error"]["code"]) == (403, "permission_denied")
    record = _last_record(d)
    assert (record["outcome"], record["status"]) == ("permission_denied", 403)
    assert "0:permission_denied,1:permission_denied,2:permission_denied" in record["reason"]


def test_partly_refused_batch_records_item_codes(setup: tuple[DaemonProcess, str, str]) -> None:
    """A mixed batch answers 200 per item and is audited partial:N/M with the refused items' codes."""
    d, mine, other = setup
    ((status, body, _),) = as_stranger(d, [_batch([f"{mine}/k", f"{other}/k", f"{mine}/nope"])])
    assert status == 200
    results = json.loads(body)["results"]
    assert "signature" in results[0]
    assert [r["error"]["code"] for r in results[1:]] == ["permission_denied", "unknown_key"]
    record = _last_record(d)
    assert (record["outcome"], record["status"]) == ("partial:2/3", 200)
    assert record["reason"] == "refused items: 1:permission_denied,2:unknown_key"


def test_batch_refused_for_other_reasons_stays_200(setup: tuple[DaemonProcess, str, str]) -> None:
    """All items refused, not all for permission: 200 with per-item errors (only permission is 403)."""
    d, mine, other = setup
    ((status, body, _),) = as_stranger(d, [_batch([f"{mine}/nope", f"{other}/k"])])
    assert status == 200
    assert [r["error"]["code"] for r in json.loads(body)["results"]] == [
        "unknown_key",
        "permission_denied",
    ]
    assert _last_record(d)["outcome"] == "partial:2/2"


def test_item_codes_are_bounded(setup: tuple[DaemonProcess, str, str]) -> None:
    """200 refused items: the record lists the first 32 codes and a count of the rest."""
    d, _, other = setup
    ((status, _, _),) = as_stranger(d, [_batch([f"{other}/k"] * 200)])
    assert status == 403
    reason = _last_record(d)["reason"]
    assert reason.count(":permission_denied") == 32 and reason.endswith("+168 more")
