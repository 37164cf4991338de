"""signerd.wire."""

from ._envelopes import PEER_KID_RE, decimal_seconds, telemetry_input
from ._names import VersionState

__all__ = ["PEER_KID_RE", "VersionState", "decimal_seconds", "telemetry_input"]
