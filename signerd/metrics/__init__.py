"""Metrics and status: ``GET /metrics`` (Prometheus text) and ``GET /v1/status``.

- ``Metrics``: attaches both routes to a server, and the recorder's hooks
  (requests, coalesced batches, audit writes) to the server, the key service
  and the audit trail of one serving process.
- ``Sources``: what a snapshot reads (configuration, key service, audit trail,
  federation, worker table).
- ``metrics_directory``/``reset_directory``: where the workers' series are
  written (prometheus-client's multiprocess mode), emptied when the daemon starts.

docs/metrics.md lists every series, its labels and how workers are summed.
"""

from .._config import Config
from ..workers import runtime_path
from ._recorder import LATENCY_BUCKETS, reset_directory
from ._routes import Metrics, status_doc
from ._state import VERSION, Snapshot, Sources

__all__ = [
    "LATENCY_BUCKETS",
    "VERSION",
    "Metrics",
    "Snapshot",
    "Sources",
    "metrics_directory",
    "reset_directory",
    "status_doc",
]


def metrics_directory(config: Config) -> str:
    """The directory of the workers' series files, in the runtime directory."""
    return runtime_path(config.socket, "metrics")
