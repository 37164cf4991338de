"""The runnable federation example, end to end: two real daemons, real mTLS on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.timeout(200)

EXPECTED = [
    "signed telemetry -> gateway",
    "feedback verified by kid at the producer",
    "replayed request",
    "tampered body",
    "wrong service certificate",
    "wrong tenant",
    "wrong schema (producer, local)",
    "wrong schema (producer's signerd)",
]


def test_example_runs_end_to_end_and_refuses_each_attack() -> None:
    """`python -m examples.federation` meets every expectation and exits 0 within its time bound."""
    env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "examples.federation", "--timeout", "150"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the example stops its daemons on SIGTERM
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"the example did not finish in time:\n{out}")
    assert proc.returncode == 0, out
    for what in EXPECTED:
        assert any(line.startswith("ok") and what in line for line in out.splitlines()), out
    assert "FAIL" not in out
    assert "all expectations met" in out
