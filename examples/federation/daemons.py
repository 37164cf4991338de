"""One signerd daemon per side of the federation: its own SoftHSM token, socket, config and state.

``start`` makes the token, writes the daemon's configuration and starts
``python -m signerd`` with ``SOFTHSM2_CONF`` pointing at that token only, all
through ``signerd.testing``, and waits for it to be ready. ``Daemon.stop``
ends it (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from signerd.testing import SignerdProcess, make_token
from signerd.testing import start as start_signerd

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ["sign", "verify", "jwks", "list", "create", "trust"]

Daemon = SignerdProcess


def config(base: Path, backend: dict[str, Any], bootstrap: list[str]) -> dict[str, Any]:
    """The daemon's configuration: SoftHSM backend, audit trail, federation state, one policy rule.

    This example runs everything as one user: that user may sign, verify and manage
    trusted peer keys, in every tenant.
    """
    return {
        "server": {"socket": str(base / "run" / "signerd.sock"), "log_level": "info"},
        "keys": {"default_backend": "hsm", "bootstrap": bootstrap},
        "backends": {"hsm": backend},
        "audit": {"path": str(base / "audit" / "audit.jsonl"), "fsync": False},
        "federation": {"state_dir": str(base / "state"), "skew": 300},
        "policy": {
            "rules": [
                {
                    "name": "example",
                    "uids": [os.getuid()],
                    "tenants": ["*"],
                    "operations": OPERATIONS,
                }
            ]
        },
    }


def start(name: str, base: Path, bootstrap: list[str], *, wait: float = 30.0) -> Daemon:
    """A signerd for one side, with its own token (label ``NAME-token``), ready to serve.

    It gets SIGTERM if this process dies, even by SIGKILL (start it from the main thread).
    """
    token = make_token(base / "softhsm", f"{name}-token")
    return start_signerd(
        config(base, token.backend_config(), bootstrap),
        base,
        wait=wait,
        env=token.env(),
        cwd=ROOT,
        die_with_parent=True,
    )
