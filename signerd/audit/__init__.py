"""The audit trail: one hash-chained record per call, written or the call refused; anchors of
its head kept elsewhere; and the checks that tell whether anything was removed or edited."""

from ._anchor import GENESIS, Anchor, Lost, load_key, parse_anchor, payload_hmac, read_anchors
from ._build import audit_from_config
from ._chain import VerifyReport
from ._check import audit_files, find_anchors, verify_file, verify_files, verify_set, verify_trail
from ._events import (
    SECURITY_OUTCOMES,
    AuditEvent,
    AuditSink,
    PendingRecord,
    QueueingAuditSink,
    WriteAheadAuditSink,
)
from ._settings import AuditSettings, audit_settings, worker_path
from ._trail import AuditTrail

__all__ = [
    "GENESIS",
    "SECURITY_OUTCOMES",
    "Anchor",
    "AuditEvent",
    "AuditSettings",
    "AuditSink",
    "AuditTrail",
    "Lost",
    "PendingRecord",
    "QueueingAuditSink",
    "VerifyReport",
    "WriteAheadAuditSink",
    "audit_files",
    "audit_from_config",
    "audit_settings",
    "find_anchors",
    "load_key",
    "parse_anchor",
    "payload_hmac",
    "read_anchors",
    "verify_file",
    "verify_files",
    "verify_set",
    "verify_trail",
    "worker_path",
]
