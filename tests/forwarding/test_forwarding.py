"""Audit forwarding to a real rsyslogd: every record, in order, once; checkpoints signed;
the collector down, then back; the bound's refusal."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from signerd.client import Client
from signerd.errors import SignerdError
from signerd.testing import SignerdProcess, wait_until

from ..conftest import unique
from ..support.rsyslog import Rsyslog, wait_for
from .conftest import (
    assert_all_once_but_replays,
    assert_torn_only_at_a_loss,
    forwarded,
    forwarding_daemon,
    replayed,
    settled_lines,
    sign_many,
    sign_through_an_outage,
    torn_apart,
    trail_lines,
    wait_all,
)

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("workers", [2, 1])
def test_records_arrive_at_rsyslog_in_order_and_once(
    tmp_path: Path, collector: Rsyslog, workers: int
) -> None:
    """Every record of every worker's chain (or of the single process's trail) reaches
    the collector byte for byte, in the chain's order, exactly once, with signed
    checkpoints beside them."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector, workers=workers) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        assert sign_many(d, key, 60) == 60
        # outcome records follow their answers by a moment: wait until the trail is whole
        wait_until(lambda: sum(len(v) for v in trail_lines(d).values()) >= 121, timeout=30)
        wait_until(
            lambda: dict(forwarded(collector)) == trail_lines(d),
            timeout=60,
            what="every record of the trail at the collector",
        )
        wait_for(collector, 2, msgid="checkpoint")
    messages = collector.messages()
    assert {(m.facility, m.severity) for m in messages if m.msgid == "audit"} == {(13, 6)}
    assert {(m.facility, m.severity) for m in messages if m.msgid == "checkpoint"} == {(13, 5)}
    assert {m.hostname for m in messages} == {"host-a"}


def test_collector_down_for_30s_under_load_gets_every_record(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """With signing going on all along, the collector stopped for 30 s and started again
    ends up with every record of every chain in order; a record comes twice only when
    the collector reset the connection and the forwarder logged sending it again; no
    sign failed."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector) as d:
        seen = sign_through_an_outage(d, key, collector, resume_timeout=60)
        want = settled_lines(d)
        wait_all(collector, want, timeout=120)
    assert seen.failed == 0
    assert seen.during > 100  # signing went on while the collector was down
    whole, torn = torn_apart(forwarded(collector))
    assert_torn_only_at_a_loss(torn, want, d.log_text())
    assert_all_once_but_replays(whole, want, replayed(d))


def test_past_the_bound_signs_are_refused_until_the_collector_catches_up(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """on_lag = "refuse": with the collector down, signs are refused (503
    audit_unavailable) once the unforwarded trail passes max_lag_bytes; once the collector
    is back and caught up, signs succeed again and every record still arrives (twice
    only when sent again after a reset)."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector, max_lag_bytes=8192) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
            wait_for(collector, 1)
            collector.stop()
            refused: list[SignerdError] = []
            signed: list[float] = []  # when each sign was answered
            deadline = time.monotonic() + 60
            while not refused and time.monotonic() < deadline:
                try:
                    c.sign(key, b"while the collector is down")
                    signed.append(time.monotonic())
                except SignerdError as exc:
                    refused.append(exc)
            refused_at = time.monotonic()
            assert refused, "never refused"
            assert refused[0].code == "audit_unavailable"
            assert refused[0].status == 503
            lag_records = sum(len(v) for v in trail_lines(d).values())
            # refused soon after the bound: each sign's intent record (durable before its
            # answer) has at least ``shortest`` bytes, so after ``past`` signs the trail is
            # past the bound for certain; the forwarder looks every 50 ms, so a few signs of
            # that interval pass it, and a sign is refused well within a second
            shortest = min(len(x) for v in trail_lines(d).values() for x in v)
            past = -(-8192 // shortest)
            if len(signed) > past:
                assert refused_at - signed[past - 1] < 1.0, (len(signed), past)
            collector.start()

            def signs() -> bool:
                try:
                    c.sign(key, b"after")
                except SignerdError:
                    return False
                return True

            wait_until(signs, timeout=60, what="signing to resume")
        want = settled_lines(d)
        assert sum(len(v) for v in want.values()) > lag_records
        wait_all(collector, want)
    assert_all_once_but_replays(dict(forwarded(collector)), want, replayed(d))


def test_drop_past_the_bound_keeps_signing_and_tells_the_collector(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """on_lag = "drop": with the collector down, signing goes on past the bound; the
    backlog is skipped with a CRITICAL signerd.forwarding_dropped line, and the collector
    gets a gap message naming the seqs it may not have got, then the records after them;
    no record is missing without a gap naming it."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector, max_lag_bytes=8192, on_lag="drop") as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
            wait_for(collector, 1)
            collector.stop()
            for i in range(80):
                c.sign(key, f"dropped {i}".encode())
            wait_until(
                lambda: "signerd.forwarding_dropped" in d.log_text(), timeout=30, what="the drop"
            )
            collector.start()
            wait_for(collector, 1, msgid="gap")
            c.sign(key, b"after the gap")
        want = settled_lines(d)
        last = {chain: json.loads(lines[-1])["seq"] for chain, lines in want.items()}
        wait_until(
            lambda: all(
                forwarded(collector).get(chain, [b"{}"])[-1:]
                and json.loads(forwarded(collector)[chain][-1]).get("seq") == seq
                for chain, seq in last.items()
            ),
            timeout=60,
            what="the records after the gap",
        )
    messages = collector.messages()
    gaps = [json.loads(m.msg) for m in messages if m.msgid == "gap"]
    first_gap = next(i for i, m in enumerate(messages) if m.msgid == "gap")
    after = [
        i
        for i, m in enumerate(messages)
        if m.msgid == "audit"
        and int(m.params["seq"]) > gaps[0]["last_seq"]
        and m.params["chain"] == gaps[0]["gap"]
    ]
    assert after and first_gap < after[0]  # the gap is told before the records after it
    assert gaps and all(g["first_seq"] <= g["last_seq"] for g in gaps)
    got = forwarded(collector)
    for chain, lines in want.items():
        seqs = [json.loads(x)["seq"] for x in got.get(chain, [])]
        skipped = {
            s for g in gaps if g["gap"] == chain for s in range(g["first_seq"], g["last_seq"] + 1)
        }
        # every record either arrived or is named by a gap (one that arrived just before
        # the collector reset the connection may be named too: it may not have been kept)
        assert sorted(set(seqs) | skipped) == [json.loads(x)["seq"] for x in lines]


def _whole_trail(d: SignerdProcess) -> dict[str, list[bytes]]:
    """Each chain's records: its rotated file (``.1``), then its current one."""
    audit_dir = d.audit_path.parent
    rotated = {
        old.name[: -len(".1")]: old.read_bytes().splitlines()
        for old in sorted(audit_dir.glob("audit.w*.jsonl.1"))
    }
    current = trail_lines(d)
    both = {c: rotated.get(c, []) + current.get(c, []) for c in set(rotated) | set(current)}
    return {chain: lines for chain, lines in both.items() if lines}


def test_rotated_trail_files_are_forwarded_to_their_end_then_the_new_ones(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """Trail files renamed away and SIGHUP (log rotation) while records are forwarded:
    every record of the old and the new files arrives once, in order."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        sign_many(d, key, 30)
        for path in d.audit_files():
            path.rename(path.with_name(path.name + ".1"))
        d.sighup()
        sign_many(d, key, 30)
        settled_lines(d)  # the last outcome record follows its answer by a moment
        want = _whole_trail(d)
        wait_for(collector, sum(len(v) for v in want.values()))
    assert sum(len(v) for v in want.values()) >= 61
    assert dict(forwarded(collector)) == want


def test_a_killed_forwarder_resumes_from_its_saved_position(
    tmp_path: Path, collector: Rsyslog
) -> None:
    """The forwarder killed with SIGKILL is started again by the daemon and goes on from
    its durable position: nothing is lost; the only records that may arrive twice are
    identical copies from the one batch that was in flight when it died."""
    key = f"{unique('fw')}/k"
    with forwarding_daemon(tmp_path / "d", collector) as d:
        with Client(d.socket_path) as c:
            c.create_key(key)
        sign_many(d, key, 30)
        wait_for(collector, 10)
        forwarder = wait_until(lambda: _forwarder_pid(d), timeout=10, what="the forwarder")
        assert forwarder is not None
        os.kill(forwarder, signal.SIGKILL)
        sign_many(d, key, 30)
        wait_until(
            lambda: _forwarder_pid(d) not in (None, forwarder), timeout=30, what="a new forwarder"
        )
        sign_many(d, key, 10)
        want = settled_lines(d)
        wait_until(
            lambda: (
                {c: sorted(set(v)) for c, v in forwarded(collector).items()}
                == {c: sorted(set(v)) for c, v in want.items()}
            ),
            timeout=60,
            what="every record at the collector",
        )
    got = forwarded(collector)
    for chain, lines in want.items():
        seqs = [json.loads(x)["seq"] for x in got[chain]]
        repeated = len(seqs) - len(set(seqs))
        assert repeated <= 512  # at most one batch
        first = [x for i, x in enumerate(got[chain]) if got[chain].index(x) == i]
        assert first == lines  # in order, each record as the trail holds it


def _forwarder_pid(d: SignerdProcess) -> int | None:
    """The pid of the daemon's forwarder process (``signerd ... --forward``), if running."""
    return d.forwarder_pid()
