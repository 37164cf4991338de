"""Audit forwarding over RELP to a real rsyslogd (imrelp): the collector answers every
message, so every record arrives once, in order, even across the collector's restart."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path
from typing import Any

import pytest

from signerd.client import Client
from signerd.testing import wait_until

from ..conftest import unique
from ..support.rsyslog import Rsyslog, wait_for
from .conftest import (
    forwarded,
    forwarding_daemon,
    settled_lines,
    sign_many,
    sign_through_an_outage,
)
from .test_tls import self_signed

pytestmark = pytest.mark.timeout(150)


def record_ids(collector: Rsyslog) -> list[str]:
    """The record id of every audit message at the collector, in arrival order."""
    return [m.params["rid"] for m in collector.messages() if m.msgid == "audit"]


def test_records_arrive_over_relp_in_order_and_once(
    tmp_path: Path, relp_collector: Rsyslog
) -> None:
    """With transport = "relp" every record of every chain reaches imrelp byte for byte,
    in the chain's order, exactly once, with signed checkpoints beside them."""
    key = f"{unique('relp')}/k"
    with forwarding_daemon(tmp_path / "d", relp_collector, transport="relp") as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        assert sign_many(d, key, 60) == 60
        want = settled_lines(d)
        assert sum(len(v) for v in want.values()) >= 121
        wait_until(
            lambda: dict(forwarded(relp_collector)) == want,
            timeout=60,
            what="every record of the trail at the collector",
        )
        wait_for(relp_collector, 2, msgid="checkpoint")
        assert "transport=relp" in d.log_text()
    ids = record_ids(relp_collector)
    assert len(ids) == len(set(ids))


def test_relp_collector_down_for_30s_under_load_gets_every_record_once(
    tmp_path: Path, relp_collector: Rsyslog
) -> None:
    """With signing going on all along, imrelp stopped for 30 s and started again ends up
    with every record of every chain exactly once (by record id) and in order; no sign
    failed."""
    key = f"{unique('relp')}/k"
    started = time.monotonic()
    with forwarding_daemon(tmp_path / "d", relp_collector, transport="relp") as d:
        seen = sign_through_an_outage(d, key, relp_collector, resume_timeout=30)
        want = settled_lines(d)
        wait_until(
            lambda: (
                sum(len(v) for v in forwarded(relp_collector).values())
                >= sum(len(v) for v in want.values())
            ),
            timeout=60,
            what="every record at the collector",
        )
        caught_up = time.monotonic() - seen.restarted
    log = d.log_text()  # the daemon stopped: its forwarder sends nothing more
    elapsed = time.monotonic() - started
    assert seen.failed == 0
    assert seen.during > 100  # signing went on while the collector was down
    ids = record_ids(relp_collector)
    twice = [rid for rid, n in collections.Counter(ids).items() if n > 1]
    assert twice == []
    assert dict(forwarded(relp_collector)) == want  # every record, in order, as the trail has it
    assert {json.loads(line)["record_id"] for v in want.values() for line in v} == set(ids)
    assert "signerd.forwarding_replay" not in log
    assert "signerd.forwarding_connection_lost" in log  # the outage was seen
    print(
        f"relp outage: {seen.during} signs while down, {len(ids)} records in all, every one at the"
        f" collector {caught_up:.1f} s after its restart, test {elapsed:.1f} s"
    )


def _relp_tls(tmp_path: Path, sender_name: str) -> tuple[Rsyslog, dict[str, Any]]:
    """An imrelp collector in TLS that takes only senders named signer.test, and the
    [forwarding] settings of a sender whose certificate names ``sender_name``."""
    server_cert, server_key = self_signed(tmp_path / "pki-collector")
    sender_cert, sender_key = self_signed(tmp_path / "pki-sender", name=sender_name)
    collector = Rsyslog(
        tmp_path / "collector",
        tls=(server_cert, server_key),
        relp=True,
        peer=(sender_cert, "signer.test"),
    )
    settings: dict[str, Any] = {
        "transport": "relp",
        "tls": True,
        "tls_ca_file": str(server_cert),
        "tls_server_name": "collector.test",
        "tls_cert_file": str(sender_cert),
        "tls_key_file": str(sender_key),
    }
    return collector, settings


def test_records_arrive_over_relp_in_tls(tmp_path: Path) -> None:
    """RELP over TLS, each side checking the other's certificate: every record arrives
    in order, once."""
    key = f"{unique('relp')}/k"
    collector, settings = _relp_tls(tmp_path, "signer.test")
    with collector, forwarding_daemon(tmp_path / "d", collector, **settings) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        sign_many(d, key, 20)
        want = settled_lines(d)
        wait_until(
            lambda: dict(forwarded(collector)) == want,
            timeout=60,
            what="every record of the trail at the collector",
        )


def test_a_sender_the_relp_collector_does_not_permit_delivers_nothing(tmp_path: Path) -> None:
    """A sender whose certificate names another host is turned away by imrelp: nothing
    arrives and the forwarder logs the collector as down."""
    key = f"{unique('relp')}/k"
    collector, settings = _relp_tls(tmp_path, "intruder.test")
    with collector, forwarding_daemon(tmp_path / "d", collector, **settings) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        sign_many(d, key, 5)
        wait_until(
            lambda: "signerd.forwarding_collector_down" in d.log_text(),
            timeout=30,
            what="the refused session",
        )
    assert collector.messages() == []
