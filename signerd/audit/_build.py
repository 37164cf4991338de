"""Building an ``AuditTrail`` from the ``[audit]`` table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._settings import audit_settings
from ._trail import AuditTrail

__all__ = ["audit_from_config"]

if TYPE_CHECKING:
    from ..workers import StallGuard


def audit_from_config(
    table: Mapping[str, Any],
    *,
    worker: int | None = None,
    workers: int | None = None,
    stall_guard: StallGuard | None = None,
) -> AuditTrail:
    """Build an AuditTrail from the ``[audit]`` table; ValueError names the bad key.

    With ``worker``, the trail is that worker's own file (``worker_path``) and, unless
    ``anchor`` is set, its own anchor file; the payload key is shared by all workers.
    ``workers``: how many there are, so that each anchor names every chain of the run.
    """
    s = audit_settings(table, worker=worker, workers=workers)
    return AuditTrail(
        s.path,
        write_timeout=s.write_timeout,
        fsync=s.fsync,
        journal_send=s.journal_send,
        anchor_path=s.anchor,
        anchor_interval=s.anchor_interval,
        key_path=s.key,
        chains=s.chains,
        stall_guard=stall_guard,
    )
