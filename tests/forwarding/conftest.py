"""The forwarding tests' collector (a real rsyslogd) and a daemon that forwards to it."""

from __future__ import annotations

import collections
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signerd.client import Client
from signerd.testing import SignerdProcess, wait_until

from ..conftest import start_daemon
from ..support.rsyslog import Rsyslog, wait_for

CHECKPOINT_KEY = "auditfwd/checkpoints"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Rsyslog]:
    with Rsyslog(tmp_path / "collector") as c:
        yield c


@pytest.fixture
def relp_collector(tmp_path: Path) -> Iterator[Rsyslog]:
    """A real rsyslogd that takes RELP (imrelp) only."""
    with Rsyslog(tmp_path / "collector", relp=True) as c:
        yield c


def forwarding_daemon(
    base: Path, collector: Rsyslog, *, workers: int = 2, **forwarding: Any
) -> SignerdProcess:
    table = {
        "host": "127.0.0.1",
        "port": collector.port,
        "checkpoint_key": CHECKPOINT_KEY,
        "checkpoint_interval": 0.5,
        "hostname": "host-a",
        **forwarding,
    }
    return start_daemon(
        base,
        server={"workers": workers},
        keys={"bootstrap": [CHECKPOINT_KEY]},
        forwarding=table,
    )


def trail_lines(d: SignerdProcess) -> dict[str, list[bytes]]:
    """Each chain's record lines, as the trail holds them (chains with a record)."""
    lines = {p.name: p.read_bytes().splitlines() for p in d.audit_files()}
    return {name: records for name, records in lines.items() if records}


def settled_lines(
    d: SignerdProcess, quiet: float = 0.3, timeout: float = 30
) -> dict[str, list[bytes]]:
    """``trail_lines`` once the trail has stopped growing for ``quiet`` seconds (an outcome
    record follows its answer by a moment)."""
    last: list[dict[str, list[bytes]]] = [trail_lines(d)]
    since = [time.monotonic()]

    def still() -> bool:
        now = trail_lines(d)
        if now != last[0]:
            last[0], since[0] = now, time.monotonic()
        return time.monotonic() - since[0] >= quiet

    wait_until(still, timeout=timeout, interval=0.05, what="the trail to settle")
    return last[0]


def forwarded(collector: Rsyslog) -> dict[str, list[bytes]]:
    """Each chain's record lines, as the collector got them (in arrival order)."""
    got: dict[str, list[bytes]] = collections.defaultdict(list)
    for m in collector.messages():
        if m.msgid == "audit":
            got[m.params["chain"]].append(m.msg)
    return got


def sign_many(d: SignerdProcess, key: str, count: int) -> int:
    """Sign ``count`` payloads; how many were signed (the others were refused)."""
    signed = 0
    with Client(d.socket_path) as c:
        for i in range(count):
            try:
                c.sign(key, f"payload {i}".encode())
                signed += 1
            except Exception:
                pass
    return signed


def checkpointed_heads(collector: Rsyslog) -> dict[str, int]:
    """Each chain's highest seq a checkpoint at the collector names."""
    heads: dict[str, int] = {}
    for m in collector.messages():
        if m.msgid == "checkpoint":
            chain, seq = m.params["chain"], int(m.params["seq"])
            heads[chain] = max(seq, heads.get(chain, 0))
    return heads


def heads(lines: dict[str, list[bytes]]) -> dict[str, int]:
    """Each chain's last seq."""
    return {chain: json.loads(records[-1])["seq"] for chain, records in lines.items()}


def replayed(d: SignerdProcess) -> dict[str, set[int]]:
    """The seqs of each chain the forwarder logged as sent again after a reset."""
    found: dict[str, set[int]] = collections.defaultdict(set)
    for m in re.finditer(
        r"signerd\.forwarding_replay chain=(\S+) from_seq=(\d+) to_seq=(\d+)", d.log_text()
    ):
        found[m.group(1)].update(range(int(m.group(2)), int(m.group(3)) + 1))
    return found


def assert_all_once_but_replays(
    got: dict[str, list[bytes]], want: dict[str, list[bytes]], replays: dict[str, set[int]]
) -> None:
    """Every record arrived, in order and as the trail holds it; a record arrived twice
    only when the forwarder logged sending it again after the collector reset."""
    assert set(got) == set(want)
    for chain, lines in want.items():
        seen: set[int] = set()
        first: list[bytes] = []
        for line in got[chain]:
            seq = json.loads(line)["seq"]
            if seq in seen:
                assert seq in replays.get(chain, set()), (chain, seq, "twice, not replayed")
                continue
            seen.add(seq)
            first.append(line)
        assert first == lines


def torn_apart(
    got: dict[str, list[bytes]],
) -> tuple[dict[str, list[bytes]], dict[str, list[bytes]]]:
    """Each chain's messages that are whole records, and those that are not: over plain TCP
    a frame cut short when the collector went down can reach its file (docs: "RELP or
    TCP"); the record itself is sent again."""
    whole: dict[str, list[bytes]] = collections.defaultdict(list)
    torn: dict[str, list[bytes]] = collections.defaultdict(list)
    for chain, lines in got.items():
        for line in lines:
            try:
                json.loads(line)
            except ValueError:
                torn[chain].append(line)
            else:
                whole[chain].append(line)
    return dict(whole), dict(torn)


def assert_torn_only_at_a_loss(
    torn: dict[str, list[bytes]], want: dict[str, list[bytes]], log: str
) -> None:
    """A message that is not a whole record is the start of one the trail holds, and comes
    only with a connection the forwarder saw lost."""
    if torn:
        assert "signerd.forwarding_connection_lost" in log
    for chain, pieces in torn.items():
        for piece in pieces:
            assert any(line.startswith(piece) for line in want[chain]), (chain, piece[:80])


def wait_all(collector: Rsyslog, want: dict[str, list[bytes]], timeout: float = 60.0) -> None:
    """Until every record of ``want`` is at the collector (copies, and frames cut short
    over plain TCP, aside)."""
    seqs = {chain: {json.loads(x)["seq"] for x in lines} for chain, lines in want.items()}

    def done() -> bool:
        got = torn_apart(forwarded(collector))[0]
        return all(seqs[c] <= {json.loads(x)["seq"] for x in got.get(c, [])} for c in seqs)

    wait_until(done, timeout=timeout, what="every record at the collector")


@dataclass
class Outage:
    """What two steady signers saw around a collector's outage."""

    signed: int = 0
    failed: int = 0
    during: int = 0  # signs made while the collector was down
    restarted: float = 0.0  # monotonic time of the collector's restart


def sign_through_an_outage(
    d: SignerdProcess, key: str, collector: Rsyslog, resume_timeout: float
) -> Outage:
    """Two threads sign with ``key`` (created here) all along; once 50 signs were made and
    forwarded the collector is stopped for 30 s and started again; returns once 50 more
    signs were made after it."""
    seen = Outage()
    stop = threading.Event()
    lock = threading.Lock()

    def load() -> None:
        with Client(d.socket_path) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    c.sign(key, f"steady {i}".encode())
                    ok = True
                except Exception:
                    ok = False
                with lock:
                    seen.signed += ok
                    seen.failed += not ok
                time.sleep(0.005)

    with Client(d.socket_path) as c:
        c.create_key(key)
    loaders = [threading.Thread(target=load, daemon=True) for _ in range(2)]
    for t in loaders:
        t.start()
    try:
        wait_until(lambda: seen.signed >= 50, timeout=30, what="signs before the outage")
        wait_for(collector, 20)
        collector.stop()
        before = seen.signed
        time.sleep(30)  # the outage itself, not a synchronisation
        seen.during = seen.signed - before
        collector.start()
        seen.restarted = time.monotonic()
        wait_until(
            lambda: seen.signed >= before + seen.during + 50, timeout=resume_timeout, what="signs"
        )
    finally:
        stop.set()
        for t in loaders:
            t.join(30)
    return seen
