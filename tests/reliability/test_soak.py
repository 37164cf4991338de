"""The soak: minutes of mixed load on a daemon with two workers on SoftHSM, while its audit
trail is rotated and its policy reloaded, then checked (docs/reliability.md, "Soak").

The load lasts SIGNERD_SOAK_SECONDS (default 120; ``make soak`` runs 600). The PNG of the
run goes to SIGNERD_SOAK_PNG (default: soak.png in the test's directory), its numbers beside
it (the same name, ``.json``); both paths are printed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ..conftest import start_daemon, unique
from ..support.soak import create_keys, read_requests, run_load
from ..support.soak_checks import audit_pairs, audit_records, measure, plot, verify_trail
from ..support.soak_watch import Chores, Monitor

SECONDS = float(os.environ.get("SIGNERD_SOAK_SECONDS", "120"))
PNG = os.environ.get("SIGNERD_SOAK_PNG")
MAX_NONCES = 4000  # federation.nonces.max_entries of the daemon under test
NONCE_TTL = 20  # federation.nonce_ttl: live nonces are about 20 s of envelope verifies
FDS_SPREAD = 8  # max - min of the daemon's open fds after warm-up (4 clients' connections)
FDS_DRIFT = 2  # median of the last 5 samples minus that of the first 5 after warm-up
RSS_GROWTH = 0.10
P99_RATIO = 1.5

pytestmark = [pytest.mark.slow, pytest.mark.timeout(int(SECONDS) + 300)]


def _federation(state: Path) -> dict[str, Any]:
    return {
        "state_dir": str(state),
        "skew": 10,
        "nonce_ttl": NONCE_TTL,
        "nonces": {"max_entries": MAX_NONCES, "max_entries_per_tenant": MAX_NONCES},
    }


def test_soak_mixed_load_with_rotations_and_reloads(tmp_path: Path) -> None:
    """Under rotations and reloads: no unexpected error, nothing leaks, the trail pairs up."""
    base = tmp_path / "d"
    d = start_daemon(
        base,
        server={"workers": 2},
        audit={"fsync": True},
        federation=_federation(base / "state"),
    )
    tenant = unique("soak")
    keys = [f"{tenant}/k{n}" for n in range(3)]
    rotating = keys[0]
    setup_log = tmp_path / "requests.0.jsonl"
    monitor = Monitor(d, base / "state" / "nonces.sqlite3")
    chores = Chores(d, every=SECONDS / 10, tenant=tenant)
    try:
        create_keys(str(d.socket_path), keys, setup_log)
        monitor.start()
        start = time.monotonic()
        logs = run_load(str(d.socket_path), keys, rotating, tmp_path, SECONDS, during=chores.run)
        end = time.monotonic()
    finally:
        monitor.stop()
        status = d.stop()
    log = d.log_text()
    assert status == 0, log[-3000:]
    requests = read_requests([setup_log, *logs])
    m = measure(requests, monitor.samples, rotating, start, end, NONCE_TTL)
    png = Path(PNG) if PNG else tmp_path / "soak.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot(png, requests, monitor.samples, start, chores.log)
    summary = {**m.summary(), "rotations": chores.rotations, "reloads": chores.reloads}
    png.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    print(f"\nsoak: {png} {png.with_suffix('.json')}\n{json.dumps(summary)}")

    assert not monitor.errors, monitor.errors
    assert not m.unexpected, summary
    assert m.worker_sets == 1, "a worker was replaced during the soak"
    assert chores.rotations >= 2 and chores.reloads >= 2, summary
    assert "level=critical" not in log and "level=error" not in log, log[-3000:]
    assert m.rss_growth < RSS_GROWTH, summary
    assert m.fds_max - m.fds_min <= FDS_SPREAD, summary
    assert m.fds_end - m.fds_start <= FDS_DRIFT, summary
    assert 0 < m.nonces_max <= MAX_NONCES, summary
    assert m.nonces_unexpired <= 0, summary  # expired nonces are purged
    assert m.p99_last <= P99_RATIO * m.p99_first, summary

    directory = d.audit_path.parent
    files = sorted(p.name for p in directory.glob("*.jsonl*") if ".anchor" not in p.name)
    assert len(files) == 2 * (chores.rotations + 1), files  # each worker's live and rotated
    records = audit_records(directory)
    code, out = verify_trail(directory)
    assert code == 0, out[-3000:]
    assert out.startswith(f"ok: {len(records)} records, chain intact"), out[-3000:]
    assert "no outcome record" not in out, out[-3000:]
    problems = audit_pairs(requests, records)
    assert not problems, problems[:20]
