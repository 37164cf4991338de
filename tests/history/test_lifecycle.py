"""A concurrent key lifecycle on real daemons, recorded as a history and checked after.

The run lasts SIGNERD_HISTORY_SECONDS (default 30; ``make history`` runs 60) per backend.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..conftest import start_daemon, unique
from ..support.history import load
from ..support.history_checks import check, count_by, summary
from ..support.history_run import run
from ..support.openbao import vault_backend_config

SECONDS = float(os.environ.get("SIGNERD_HISTORY_SECONDS", "30"))


def _checked(
    paths: list[Path], *, transit: bool = False, stale: float = 0.0, logs: str = ""
) -> dict[str, Any]:
    ops, pubkeys = load(paths)
    anomalies = check(ops, pubkeys, transit=transit, stale=stale)
    counts = count_by(ops)
    assert not anomalies, f"{summary(anomalies)}\n{counts}\n{_troubles(logs)}"
    return counts


def _troubles(logs: str) -> str:
    """The daemons' warnings and errors, the last 40, to say why an operation failed."""
    lines = [line for line in logs.splitlines() if re.search(r"level=(warn|error|crit)", line)]
    return "\n".join(lines[-40:])


def _keys() -> list[str]:
    tenant = unique("hi")
    return [f"{tenant}/k{n}" for n in range(3)]


def _assert_busy(counts: dict[str, Any]) -> None:
    """Every kind of operation happened and succeeded at least once."""
    for f in ("sign", "verify", "rotate", "promote", "retire", "destroy", "tverify", "fverify"):
        assert counts.get(f, {}).get("ok", 0) > 0, counts


def test_history_on_softhsm_with_workers(tmp_path: Path) -> None:
    """SoftHSM, 3 workers, 4 client processes on 3 keys: the history has no anomaly."""
    d = start_daemon(tmp_path / "d", server={"workers": 3})
    try:
        paths = run([str(d.socket_path)], _keys(), tmp_path / "h", SECONDS)
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    _assert_busy(_checked(paths, logs=d.log_text()))


def test_history_on_openbao_with_workers(tmp_path: Path, openbao_dev: Any) -> None:
    """OpenBao transit, 3 workers, 4 client processes on 3 keys: the history has no anomaly."""
    d = start_daemon(
        tmp_path / "d",
        server={"workers": 3},
        keys={"default_backend": "bao", "refresh_interval": 0},
        backends={"bao": vault_backend_config(openbao_dev)},
    )
    try:
        paths = run([str(d.socket_path)], _keys(), tmp_path / "h", SECONDS)
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
    _assert_busy(_checked(paths, transit=True, logs=d.log_text()))


REFRESH = 1.0  # keys.refresh_interval of the two daemons
LAG = 2 * REFRESH + 1.0  # a refresh period, and one re-read that may take as long, and slack


def test_history_through_two_daemons_on_one_openbao(tmp_path: Path, openbao_dev: Any) -> None:
    """Two daemons on one OpenBao and one nonce store, clients on both: no anomaly, a sign or
    verify lagging a change made through the other daemon by at most LAG seconds."""
    state = tmp_path / "state"
    common: dict[str, Any] = {
        "server": {"workers": 2},
        "keys": {"default_backend": "bao", "refresh_interval": REFRESH},
        "backends": {"bao": vault_backend_config(openbao_dev)},
        "federation": {"state_dir": str(state)},
    }
    a = start_daemon(tmp_path / "a", **common)
    b = start_daemon(tmp_path / "b", **common)
    try:
        sockets = [str(a.socket_path), str(b.socket_path)]
        paths = run(sockets, _keys(), tmp_path / "h", SECONDS)
    finally:
        assert a.stop() == 0, a.log_text()[-3000:]
        assert b.stop() == 0, b.log_text()[-3000:]
    _assert_busy(_checked(paths, transit=True, stale=LAG, logs=a.log_text() + b.log_text()))
