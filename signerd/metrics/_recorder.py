"""The series every worker writes: prometheus-client's multiprocess mode.

Each worker process writes its counters and histograms into memory-mapped
files of its own (one per kind, named by pid) in the runtime directory; the
worker that answers ``GET /metrics`` reads them all and sums them
(``_exposition``). Files of workers that ended stay, so totals survive a
worker's restart; the directory is emptied when the daemon starts.

The hot path (``request``) costs one dict lookup for the cached label
children, one counter increment and one histogram observation. Every label
value is from a closed set: operations, wire codes, configured backend names.

``signerd_backend_failovers_total{backend}`` counts the moves of a cluster
backend (OpenBao/Vault) to another node: each worker's backend counts its own,
and ``failed_over`` adds what it counted since the last tick, so the total is
over all workers. The forwarding gauges are the snapshot's (``_exposition``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, values

from ..authz import Operation
from ..server import AuditNotes, Throttled
from . import _fast as fast

__all__ = ["LATENCY_BUCKETS", "Recorder", "reset_directory", "use_directory"]

#: request and phase latencies, from 100 µs
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_NONCE_CODES = {"replayed_nonce": "replayed", "nonce_store_unavailable": "store_unavailable"}
_using: str | None = None
_pid = os.getpid()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)


def _process_id() -> int:
    """This process's pid, read once per fork (prometheus-client asks at every increment,
    and a getpid system call costs microseconds under some sandboxes)."""
    return _pid


def reset_directory(path: str) -> None:
    """Create the directory (0750) and remove the files of a previous run."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    for name in glob.glob(os.path.join(path, "*.db")):
        os.unlink(name)


def use_directory(path: str) -> None:
    """Make this process's series write into ``path`` (before any series is made)."""
    global _using
    if _using == path:
        return
    os.makedirs(path, mode=0o750, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    values.ValueClass = values.MultiProcessValue(_process_id)  # type: ignore[no-untyped-call]
    _using = path


class Recorder:
    """The series this process writes; the hooks the server and the key service call."""

    def __init__(self, backend_of: Callable[[str], str], backends: Iterable[str]) -> None:
        self._backend_of = backend_of
        none = None  # series go to no registry: the exposition reads the files
        self.requests = Counter(
            "signerd_requests",
            "Answered requests, by operation, outcome (ok, refused: 4xx, failed: 5xx) and wire code",
            ["operation", "outcome", "code"],
            registry=none,
        )
        self.duration = Histogram(
            "signerd_request_duration_seconds",
            "From the request read to its answer, by operation and the backend of its tenant",
            ["operation", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=none,
        )
        self.queued = Histogram(
            "signerd_sign_queued_seconds",
            "Time a coalesced sign batch's oldest request waited before the batch started",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=none,
        )
        self.in_backend = Histogram(
            "signerd_sign_backend_seconds",
            "Time a coalesced sign batch spent in its backend (with the signature checks)",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=none,
        )
        self.batch_size = Histogram(
            "signerd_sign_batch_size",
            "Sign requests per coalesced backend call",
            ["backend"],
            buckets=BATCH_BUCKETS,
            registry=none,
        )
        self.audit_write = Histogram(
            "signerd_audit_write_seconds",
            "Time a request waited for its durable audit record (sign and admin operations)",
            buckets=LATENCY_BUCKETS,
            registry=none,
        )
        self.nonce_refusals = Counter(
            "signerd_nonce_refusals",
            "Federation envelopes refused by the nonce store (replayed, store_unavailable)",
            ["reason"],
            registry=none,
        )
        self.audit_queue = Gauge(
            "signerd_audit_queue_depth",
            "Audit records waiting to be written, summed over the live workers",
            registry=none,
            multiprocess_mode="livesum",
        )
        self.audit_healthy = Gauge(
            "signerd_audit_healthy",
            "1 when every live worker's audit writer is open and not stuck",
            registry=none,
            multiprocess_mode="livemin",
        )
        self.failovers = Counter(
            "signerd_backend_failovers",
            "Times a cluster backend moved to another node, summed over the workers",
            ["backend"],
            registry=none,
        )
        self._children: dict[tuple[Operation, int, str, str | None], tuple[Any, Any, Any]] = {}
        self._batches: dict[str, tuple[Any, Any, Any]] = {}
        #: series updates that raised (a full disk under the directory), logged once a minute
        self.failures = Throttled("signerd.metrics_write_failed", 60.0)
        # The known label values start at 0 (and each kind's file is opened here, at start,
        # not by the first request that needs it).
        for reason in _NONCE_CODES.values():
            self.nonce_refusals.labels(reason)
        for backend in backends:
            self._batch_children(backend)
        self._audit_write = fast.histogram(self.audit_write)

    def request(self, notes: AuditNotes, outcome: str, status: int, seconds: float) -> None:
        """``Front.observe``: one answered request."""
        try:
            ident = (notes.operation, status, outcome, notes.tenant)
            children = self._children.get(ident)
            if children is None:
                children = self._children_of(notes.operation.value, status, outcome, notes.tenant)
                if len(self._children) < 4096:  # tenants are many; their backends are few
                    self._children[ident] = children
            counter, histogram, nonce = children
            counter.inc()
            histogram.observe(seconds)
            if nonce is not None:
                nonce.inc()
        except Exception as exc:  # a series that cannot be written never fails a request
            self._failed(exc)

    def _children_of(self, op: str, status: int, outcome: str, tenant: str | None) -> Any:
        kind = "ok" if status < 400 else "refused" if status < 500 else "failed"
        code = "none" if outcome == "ok" else outcome
        if tenant is None:
            backend = "none"
        elif "," in tenant:  # a batch over several tenants
            backends = {self._backend_of(t) for t in tenant.split(",")}
            backend = backends.pop() if len(backends) == 1 else "several"
        else:
            backend = self._backend_of(tenant)
        reason = _NONCE_CODES.get(code)
        return (
            fast.counter(self.requests.labels(op, kind, code)),
            fast.histogram(self.duration.labels(op, backend)),
            None if reason is None else fast.counter(self.nonce_refusals.labels(reason)),
        )

    def batch(self, backend: str, size: int, queued: float, took: float) -> None:
        """The coalescer's hook: one backend sign call of ``size`` requests."""
        try:
            children = self._batches.get(backend) or self._batch_children(backend)
            children[0].observe(size)
            children[1].observe(queued)
            children[2].observe(took)
        except Exception as exc:
            self._failed(exc)

    def failed_over(self, backend: str, count: int) -> None:
        """``count`` more moves of ``backend`` to another node (0: the series exists)."""
        try:
            child = self.failovers.labels(backend)
            if count > 0:
                child.inc(count)
        except Exception as exc:
            self._failed(exc)

    def audit_written(self, seconds: float) -> None:
        """One durable audit record a request waited for."""
        try:
            self._audit_write.observe(seconds)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.failures.note(error=type(exc).__name__)

    def _batch_children(self, backend: str) -> tuple[Any, Any, Any]:
        children = self._batches[backend] = (
            fast.histogram(self.batch_size.labels(backend)),
            fast.histogram(self.queued.labels(backend)),
            fast.histogram(self.in_backend.labels(backend)),
        )
        return children
