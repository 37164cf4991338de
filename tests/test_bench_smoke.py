"""Smoke test of the benchmark harness: ``--quick`` runs end to end and writes its files.

It checks that every path was measured, never that a target was met: the
numbers depend on the machine, and nothing here fails because it is slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cluster, metrics
from bench.run import CHECKS, PATHS

#: rows that drive two daemons (the cluster) or alternate two (metrics on/off): their notes
#: carry no single server's CPU
PAIRED = {p for p, _ in (*cluster.PATHS, *metrics.PATHS)}

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 600  # --quick takes under 2 minutes; this leaves room for a loaded machine


@pytest.mark.timeout(TIMEOUT + 120)
def test_quick_run_measures_every_path_and_writes_json_and_chart(tmp_path: Path) -> None:
    """`python -m bench.run --quick` exits 0 and writes a JSON and a PNG with a number (and CPU notes) for every path."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the harness stops its servers on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        raise AssertionError(
            f"bench.run --quick took over {TIMEOUT} s:\n{stderr[-4000:]}"
        ) from None
    finally:
        if proc.poll() is None:  # interrupted some other way: still stop it and its servers
            proc.terminate()
            proc.wait(timeout=60)
    assert proc.returncode == 0, stdout[-4000:] + stderr[-4000:]

    doc = json.loads((tmp_path / "results.json").read_text())
    rows = {row["path"]: row for row in doc["rows"]}
    assert sorted(rows) == sorted(PATHS)
    for path, row in rows.items():
        assert row["failure"] is None, (path, row["failure"])
        assert path in stdout
        if row["unit"]:
            assert row["value"] > 0, path
        else:
            assert row["ops"] > 0 and row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"], path
            assert row["throughput"] > 0, path
        notes = row["notes"]
        if path.startswith(("signerd-", "ref-minimal-")) and not row["unit"] and path not in PAIRED:
            assert notes["server_cpu_us"] > 0 and notes["client_cpu_us"] > 0, (path, notes)
        elif path.startswith("inproc-"):
            assert notes["cpu_us"] > 0, (path, notes)
    assert {"ref-minimal-seq", "ref-minimal-32"} <= set(rows)
    # the light callers cost less CPU per signature than the server they drive
    for path in ("signerd-hsm-32", "ref-minimal-32"):
        notes = rows[path]["notes"]
        assert notes["client_cpu_us"] < notes["server_cpu_us"], (path, notes)
    assert len(doc["checks"]) == len(CHECKS)
    for check in doc["checks"]:
        assert check["status"] in {"met", "missed", "info"}, check
        assert check["value"] is not None, check

    png = tmp_path / "latency.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import image

    pixels = image.imread(png)
    assert pixels.shape[0] > 300 and pixels.shape[1] > 600


@pytest.mark.timeout(300)
def test_profile_reports_cpu_per_signature_by_thread(tmp_path: Path) -> None:
    """`python -m bench.profile` measures one and 32 callers and names the threads' CPU."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.profile", "--seconds", "2", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    text = (tmp_path / "profile.txt").read_text()
    assert text == proc.stdout.rstrip("\n") + "\n" or text.strip() in proc.stdout
    for callers in (1, 32):
        section = text.split(f"\n{callers} caller(s): ", 1)[1]
        rate = float(section.split(" signatures/s", 1)[0].replace(",", ""))
        assert rate > 0 and " 0 errors, ok" in section.splitlines()[0], section[:300]
        assert "signerd CPU per signature, all processes:" in section
    assert "sign + check + fsync'd line (inproc-floor):" in text
    assert "us asleep between operations:" in text
