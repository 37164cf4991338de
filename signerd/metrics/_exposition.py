"""``GET /metrics``: the workers' series summed, and the snapshot's gauges, as text.

prometheus-client's ``MultiProcessCollector`` sums the files every worker
writes (``_recorder``). Its custom collectors cannot span processes, so what
is a state rather than a count (each key's age and versions, backends up, the
nonce store, the workers) is not written to files: the answering worker
reports it from its snapshot (``_state``), which is the same in every worker.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ._state import VERSION, Snapshot

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")


class _SnapshotCollector:
    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        snap = self.snap
        info = InfoMetricFamily("signerd_build", "The signerd version")
        info.add_metric([], {"version": VERSION})
        yield info
        yield GaugeMetricFamily(
            "signerd_start_time_seconds", "When the daemon started (unix seconds)", snap.started
        )
        up = GaugeMetricFamily(
            "signerd_backend_up", "1 when the backend answers its health check", labels=["backend"]
        )
        node = GaugeMetricFamily(
            "signerd_backend_node",
            "1 for the configured node a cluster backend (OpenBao/Vault) sends requests to now",
            labels=["backend", "node"],
        )
        for b in snap.backends:
            up.add_metric([b.name], 1.0 if b.up else 0.0)
            if b.node is not None:
                node.add_metric([b.name, b.node], 1.0)
        yield up
        yield node
        yield from _forwarding(snap)
        created = GaugeMetricFamily(
            "signerd_key_active_created_timestamp_seconds",
            "When the key's active version was created (unix seconds)",
            labels=["key"],
        )
        versions = GaugeMetricFamily(
            "signerd_key_versions", "The key's versions in each state", labels=["key", "state"]
        )
        due_at = GaugeMetricFamily(
            "signerd_key_rotation_due_timestamp_seconds",
            "When the active version reaches its keys.max_active_age (unix seconds)",
            labels=["key"],
        )
        overdue = GaugeMetricFamily(
            "signerd_key_rotation_overdue",
            "1 when the active version is older than its keys.max_active_age",
            labels=["key"],
        )
        for k in snap.keys:
            if k.active_created is not None:
                created.add_metric([k.key], k.active_created)
            for state, n in sorted(k.versions.items()):
                versions.add_metric([k.key, state], float(n))
            if k.due is not None:
                due_at.add_metric([k.key], k.due.at)
                overdue.add_metric([k.key], 1.0 if k.due.overdue else 0.0)
        yield from (created, versions, due_at, overdue)
        yield GaugeMetricFamily(
            "signerd_metrics_keys_omitted",
            "Keys without series of their own (beyond metrics.max_key_series)",
            float(snap.keys_total - len(snap.keys)),
        )
        if snap.nonce_entries is not None:
            yield GaugeMetricFamily(
                "signerd_nonce_store_entries",
                "Nonces held by the nonce store (live and not yet purged)",
                float(snap.nonce_entries),
            )
        restarts = GaugeMetricFamily(
            "signerd_worker_restarts",
            "Times the worker slot was started again after its first start",
            labels=["worker"],
        )
        for w in snap.workers:
            restarts.add_metric([str(w.index)], float(w.restarts))
        yield restarts


def _forwarding(snap: Snapshot) -> Iterator[Metric]:
    """The audit forwarder's gauges, from its shared page (none without [forwarding])."""
    fwd = snap.forwarding
    if fwd is None:
        return
    yield GaugeMetricFamily(
        "signerd_audit_forwarding_healthy",
        "1 when the audit forwarder looked at the trail lately and is within its bound",
        1.0 if fwd.healthy else 0.0,
    )
    if fwd.lag_bytes is not None:
        yield GaugeMetricFamily(
            "signerd_audit_forwarding_lag_bytes",
            "Audit trail bytes the collector has not acknowledged yet",
            float(fwd.lag_bytes),
        )
    if fwd.heartbeat_age is not None:
        yield GaugeMetricFamily(
            "signerd_audit_forwarding_heartbeat_age_seconds",
            "Seconds since the audit forwarder last looked at the trail",
            fwd.heartbeat_age,
        )


def _forget_dead(path: str) -> None:
    """Drop the live gauges of workers that ended (their pid no longer exists)."""
    for name in glob.glob(os.path.join(path, "gauge_live*.db")):
        found = _LIVE_FILE.fullmatch(os.path.basename(name))
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # exists, another user's: not ours, but alive


def render(path: str, snap: Snapshot) -> bytes:
    """The exposition: every worker's series under ``path``, and ``snap``'s (blocking: reads
    the files; run it off the event loop)."""
    _forget_dead(path)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
    registry.register(_SnapshotCollector(snap))
    return generate_latest(registry)
