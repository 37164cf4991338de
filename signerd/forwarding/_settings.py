"""The ``[forwarding]`` settings: checked, with their defaults (docs/audit-forwarding.md)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import SignerdError
from ..wire import KeyName

__all__ = ["ForwardingSettings", "forwarding_settings"]

_KNOWN = {
    "host",
    "port",
    "transport",
    "tls",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_server_name",
    "max_lag_bytes",
    "on_lag",
    "checkpoint_key",
    "checkpoint_interval",
    "checkpoint_records",
    "state",
    "hostname",
    "timeout",
}
_HOSTNAME = re.compile(r"[!-~]{1,255}")


@dataclass(frozen=True)
class ForwardingSettings:
    host: str
    port: int
    checkpoint_key: KeyName
    state: str  # the position file
    tls: bool = False
    tls_ca_file: str | None = None
    tls_server_name: str | None = None
    max_lag_bytes: int = 64 << 20
    on_lag: str = "refuse"  # or "drop"
    checkpoint_interval: float = 10.0
    checkpoint_records: int = 1000
    hostname: str = "-"
    timeout: float = 10.0  # seconds without progress before the connection is dropped
    transport: str = "tcp"  # or "relp": acknowledged by the collector itself
    tls_cert_file: str | None = None  # this host's certificate, shown when asked (RELP: always)
    tls_key_file: str | None = None


def _number(table: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"forwarding.{name}: must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def forwarding_settings(table: Mapping[str, Any], audit_path: str) -> ForwardingSettings | None:
    """The ``[forwarding]`` table checked (None when it is empty: nothing is forwarded);
    ValueError names the bad key."""
    if not table:
        return None
    for name in table:
        if name not in _KNOWN:
            raise ValueError(f"forwarding: unknown key {name!r}")
    host = table.get("host")
    if not isinstance(host, str) or not host or not host.isprintable() or len(host) > 255:
        raise ValueError("forwarding.host: required, the collector's address or name")
    port = table.get("port")
    if type(port) is not int or not 0 < port < 65536:
        raise ValueError(f"forwarding.port: required, a TCP port, got {port!r}")
    key = table.get("checkpoint_key")
    try:
        checkpoint_key = KeyName.parse(key) if isinstance(key, str) else None
    except SignerdError:  # InvalidKeyName
        checkpoint_key = None
    if checkpoint_key is None:
        raise ValueError(
            "forwarding.checkpoint_key: required, TENANT/NAME of the key that signs checkpoints"
        )
    tls = table.get("tls", False)
    if not isinstance(tls, bool):
        raise ValueError(f"forwarding.tls: must be true or false, got {tls!r}")
    files: dict[str, str | None] = {}
    for name in ("tls_ca_file", "tls_server_name", "tls_cert_file", "tls_key_file", "state"):
        value = table.get(name)
        if value is not None and (not isinstance(value, str) or not value or "\0" in value):
            raise ValueError(f"forwarding.{name}: must be a non-empty string, got {value!r}")
        files[name] = value
    transport = table.get("transport", "tcp")
    if transport not in ("tcp", "relp"):
        raise ValueError(f'forwarding.transport: "tcp" or "relp", got {transport!r}')
    if (files["tls_cert_file"] is None) != (files["tls_key_file"] is None):
        raise ValueError("forwarding.tls_cert_file and forwarding.tls_key_file: both or neither")
    if files["tls_cert_file"] is not None and not tls:
        raise ValueError("forwarding.tls_cert_file: needs tls = true")
    if transport == "relp" and tls and files["tls_cert_file"] is None:
        raise ValueError(
            'forwarding.tls_cert_file: required with transport = "relp" and tls = true'
            " (imrelp's TLS asks every sender for its certificate)"
        )
    on_lag = table.get("on_lag", "refuse")
    if on_lag not in ("refuse", "drop"):
        raise ValueError(f'forwarding.on_lag: "refuse" or "drop", got {on_lag!r}')
    hostname = table.get("hostname", socket.gethostname())
    if not isinstance(hostname, str) or not _HOSTNAME.fullmatch(hostname):
        raise ValueError("forwarding.hostname: printable ASCII without spaces, 1 to 255")
    records = table.get("checkpoint_records", 1000)
    if type(records) is not int or not 1 <= records <= 1_000_000:
        raise ValueError(f"forwarding.checkpoint_records: 1 to 1000000, got {records!r}")
    lag = table.get("max_lag_bytes", 64 << 20)
    if type(lag) is not int or not 4096 <= lag <= 1 << 40:
        raise ValueError(f"forwarding.max_lag_bytes: 4096 to 2**40, got {lag!r}")
    state = files["state"] or os.path.join(os.path.dirname(audit_path), "forwarding.state")
    return ForwardingSettings(
        host,
        port,
        checkpoint_key,
        state,
        tls,
        files["tls_ca_file"],
        files["tls_server_name"],
        lag,
        str(on_lag),
        _number(table, "checkpoint_interval", 10.0, 0.05, 3600),
        records,
        hostname,
        _number(table, "timeout", 10.0, 0.5, 300),
        str(transport),
        files["tls_cert_file"],
        files["tls_key_file"],
    )
