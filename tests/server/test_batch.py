"""Batch sign refusals are visible and bounded: all refused for permission is 403, all over the
rate 429; a batch's record lists what was signed, and summarises the refused items.

The caller is ``nobody``, granted sign on one tenant only (rate 0.01/s, burst 300); the keys
live in that tenant and in another one.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonProcess, policy_allow_all, start_daemon, unique, wait_until
from .test_amplification import as_stranger, http_post

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def setup(shared_tmp: Path) -> Iterator[tuple[DaemonProcess, str, str]]:
    base = shared_tmp
    mine, other = unique("mine"), unique("othr")
    policy: dict[str, Any] = policy_allow_all()
    policy["rules"].append(
        {
            "name": "gw",
            "uids": [65534],
            "tenants": [mine],
            "operations": ["sign"],
            "rate": 0.01,
            "burst": 300,
        }
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


def _batch(keys: list[str]) -> bytes:
    data = base64.b64encode(b"payload").decode()
    return http_post(
        "/v1/sign", json.dumps({"items": [{"key": k, "data": data} for k in keys]}).encode()
    )


def _stranger_records(d: DaemonProcess) -> list[dict[str, Any]]:
    return [r for r in d.audit_records() if r["peer"]["uid"] == 65534]


def _batch_record(d: DaemonProcess, reqs: list[bytes]) -> tuple[tuple[int, str, float], Any]:
    """The answer to one batch sent as the stranger, and its audit record: a record nobody
    waits for joins the next write, within 50 ms, so it is waited for here."""
    before = len(_stranger_records(d))
    (answer,) = as_stranger(d, reqs)

    def final() -> list[dict[str, Any]]:
        return [r for r in _stranger_records(d)[before:] if r["outcome"] != "intent"]

    return answer, wait_until(final, 5.0, "the batch's record")[-1]


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def test_batch_refused_for_permission_everywhere_is_403(
    setup: tuple[DaemonProcess, str, str],
) -> None:
    """Every item in another tenant: 403, audited with counts, item codes and a names digest."""
    d, _, other = setup
    names = [f"{other}/k", f"{other}/k", f"{other}/nope"]
    (status, body, _), record = _batch_record(d, [_batch(names)])
    assert (status, json.loads(body)["error"]["code"]) == (403, "permission_denied")
    assert (record["outcome"], record["status"]) == ("permission_denied", 403)
    assert record["reason"] == (
        "every item was refused: refused 3 of 3 items (permission_denied=3): "
        f"0:permission_denied,1:permission_denied,2:permission_denied; "
        f"names sha256:{_names_digest(names)}"
    )
    assert (record["payload_hmac"], record["key"], record["tenant"]) == ([], None, None)


def test_partly_refused_batch_records_item_codes(setup: tuple[DaemonProcess, str, str]) -> None:
    """A mixed batch answers 200 per item; its record holds the signed item and summarises the rest."""
    d, mine, other = setup
    (status, body, _), record = _batch_record(
        d, [_batch([f"{mine}/k", f"{other}/k", f"{mine}/nope"])]
    )
    assert status == 200
    results = json.loads(body)["results"]
    assert "signature" in results[0]
    assert [r["error"]["code"] for r in results[1:]] == ["permission_denied", "unknown_key"]
    assert (record["outcome"], record["status"]) == ("partial:2/3", 200)
    assert record["reason"] == (
        "refused 2 of 3 items (permission_denied=1,unknown_key=1): "
        "1:permission_denied,2:unknown_key; "
        f"names sha256:{_names_digest([f'{other}/k', f'{mine}/nope'])}"
    )
    assert len(record["payload_hmac"]) == 1
    assert (record["key"], record["tenant"], record["kid"]) == (
        f"{mine}/k",
        mine,
        results[0]["kid"],
    )


def test_batch_refused_for_other_reasons_stays_200(setup: tuple[DaemonProcess, str, str]) -> None:
    """All items refused, not all for permission: 200 with per-item errors (only permission is 403)."""
    d, mine, other = setup
    (status, body, _), record = _batch_record(d, [_batch([f"{mine}/nope", f"{other}/k"])])
    assert status == 200
    assert [r["error"]["code"] for r in json.loads(body)["results"]] == [
        "unknown_key",
        "permission_denied",
    ]
    assert record["outcome"] == "partial:2/2"


def test_refused_batch_record_is_bounded(setup: tuple[DaemonProcess, str, str]) -> None:
    """256 refused items of 256 names: one record under 1.5 KiB (8 codes listed, a count, a digest)."""
    d, _, other = setup
    names = [f"{other}/k{i:03d}-{'x' * 50}" for i in range(256)]
    (status, _, _), record = _batch_record(d, [_batch(names)])
    assert status == 403
    lines = [x for p in d.audit_files() for x in p.read_bytes().splitlines()]
    (line,) = [x for x in lines if json.loads(x)["record_id"] == record["record_id"]]
    assert len(line) < 1536, len(line)
    reason = json.loads(line)["reason"]
    assert reason.count(":permission_denied") == 8 and "+248 more" in reason
    assert reason.endswith(f"names sha256:{_names_digest(names)}")
    assert b"k100" not in line


def test_granted_batch_record_and_batches_over_the_rate(
    setup: tuple[DaemonProcess, str, str],
) -> None:
    """256 signed items: one record within 1.5 KiB + 0.4 KiB per item; past the burst a batch
    signs what is left, and one with nothing granted (over the rate, or refused) is 429."""
    d, mine, other = setup
    full = [f"{mine}/k"] * 256
    over = [f"{mine}/k"] * 10 + [f"{other}/k"]  # over the rate, and refused
    answers = as_stranger(d, [_batch(full), _batch(full), _batch(over)])
    statuses = [s for s, _, _ in answers]
    assert statuses == [200, 200, 429], statuses
    second = json.loads(answers[1][1])["results"]
    assert sum("signature" in r for r in second) in (44, 45)  # burst 300, rate 0.01/s
    assert json.loads(answers[2][1])["error"]["code"] == "rate_limited"
    lines = [x for p in d.audit_files() for x in p.read_bytes().splitlines()]
    ours = [x for x in lines if b'"uid":65534' in x]
    first = max(ours, key=len)
    assert len(json.loads(first)["payload_hmac"]) == 256
    assert len(first) <= 1536 + 400 * 256, len(first)
