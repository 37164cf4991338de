"""signerd.wire."""

from ._envelopes import PEER_KID_RE, decimal_seconds, telemetry_input

__all__ = ["PEER_KID_RE", "decimal_seconds", "telemetry_input"]
