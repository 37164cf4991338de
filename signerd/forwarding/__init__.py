"""Audit that leaves the host: every trail record and signed checkpoints of each chain's
head, forwarded as RFC 5424 syslog over RELP, or TCP (octet-counted framing), plain or
in TLS, to a remote collector, from the trail files themselves (the trail is the buffer); the bound on
what is not yet acknowledged, and the check of a trail against forwarded checkpoints.

- ``Forwarder``: the loop (run in its own process by the daemon).
- ``RelpCollector``: the RELP session (``RelpReader``/``relp_frame``: its frames).
- ``forwarding_settings``: the ``[forwarding]`` table checked.
- ``LagFlag`` / ``LagGate`` / ``GatedSink``: the bound's refusal, shared with the workers.
- ``read_checkpoints`` / ``jwks_keys``: the offline check of a collector's file.
"""

from ._checkpoint import (
    Checkpoint,
    Signer,
    anchors_of,
    jwks_keys,
    read_checkpoints,
    sign_checkpoint,
)
from ._forwarder import Forwarder
from ._gate import LAG_PAGE, MAX_SILENCE, GatedSink, LagFlag, LagGate
from ._relp import RelpCollector, RelpError, RelpReader, relp_frame
from ._settings import ForwardingSettings, forwarding_settings
from ._state import Position, load_state, save_state
from ._syslog import Syslog, frame, message, parse

__all__ = [
    "LAG_PAGE",
    "MAX_SILENCE",
    "Checkpoint",
    "Forwarder",
    "ForwardingSettings",
    "GatedSink",
    "LagFlag",
    "LagGate",
    "Position",
    "RelpCollector",
    "RelpError",
    "RelpReader",
    "Signer",
    "Syslog",
    "anchors_of",
    "forwarding_settings",
    "frame",
    "jwks_keys",
    "load_state",
    "message",
    "parse",
    "read_checkpoints",
    "relp_frame",
    "save_state",
    "sign_checkpoint",
]
