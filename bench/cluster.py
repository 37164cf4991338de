"""Two signerd daemons ("hosts") against a three-node OpenBao raft cluster.

The cluster is the tests' own harness (``tests.support.openbao.raft_cluster``:
three ``bao server`` processes on loopback, raft storage, initialised and
unsealed); each daemon lists every node and signs on the active one. The row
is the signing rate of both daemons together, callers split evenly.
"""

from __future__ import annotations

import multiprocessing
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import daemon as sd
from .load import Op
from .services import start_daemon

if TYPE_CHECKING:
    from .run import Bench

PATHS = [
    ("signerd-cluster-seq", "two signerd on a 3-node OpenBao raft cluster, one caller each"),
    ("signerd-cluster-64", "two signerd on a 3-node OpenBao raft cluster, 64 callers"),
]
KEY = "benchc/k1"


@dataclass
class EitherHost:
    """Each caller signs through one of the hosts, in turn across every load process
    (a counter shared with the spawned processes), so callers are split evenly."""

    sockets: tuple[str, ...]
    key: str
    _turn: Any = field(
        default_factory=lambda: multiprocessing.get_context("spawn").Value("i", 0), repr=False
    )

    def open(self) -> Op:
        with self._turn.get_lock():
            turn = self._turn.value
            self._turn.value += 1
        return sd.SignerdSign(self.sockets[turn % len(self.sockets)], self.key).open()


def measure(bench: Bench, tmp: Path) -> None:
    """The cluster rows: boot the cluster, start two daemons on it, drive both."""
    from tests.support.openbao import raft_cluster, vault_backend_config

    with bench.section(PATHS), ExitStack() as stack:
        bench.log("starting a three-node OpenBao raft cluster")
        cluster = stack.enter_context(raft_cluster(tmp / "raft"))
        bench.meta_notes["cluster_boot_seconds"] = round(cluster.boot_seconds, 1)
        sockets = []
        for host in ("a", "b"):
            backend = vault_backend_config(cluster.nodes[0], addr=cluster.addrs)
            config, sock = sd.write_config(
                tmp, f"signerd-cluster-{host}", backend, [KEY], keys={"refresh_interval": 5}
            )
            start_daemon(stack, config, tmp / f"signerd-cluster-{host}")
            sockets.append(sock)
        began = time.monotonic()
        leader = cluster.leader().node_id
        bench.meta_notes["cluster_leader"] = leader
        bench.measure(*PATHS[0], EitherHost(tuple(sockets), KEY), callers=2)
        bench.measure(*PATHS[1], EitherHost(tuple(sockets), KEY), callers=64)
        bench.meta_notes["cluster_seconds"] = round(time.monotonic() - began, 1)
