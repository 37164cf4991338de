"""One signerd daemon per side of the federation: its own SoftHSM token, socket, config and state.

``start`` makes the token with ``softhsm/make-token.sh``, writes the daemon's
TOML configuration, starts ``python -m signerd`` with ``SOFTHSM2_CONF``
pointing at that token only, and waits for it to be ready. ``stop`` ends it
(SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
OPERATIONS = ["sign", "verify", "jwks", "list", "create", "trust"]
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, even by SIGKILL."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Daemon:
    name: str
    dir: Path
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode


def _q(value: str) -> str:
    return json.dumps(value)  # a TOML basic string is a JSON string for these paths


def config_text(base: Path, token_label: str, bootstrap: list[str]) -> str:
    """The daemon's configuration: SoftHSM backend, audit trail, federation state, one policy rule."""
    keys = ", ".join(_q(k) for k in bootstrap)
    ops = ", ".join(_q(o) for o in OPERATIONS)
    return f"""\
[server]
socket = {_q(str(base / "run" / "signerd.sock"))}
log_level = "info"

[keys]
default_backend = "hsm"
bootstrap = [{keys}]

[backends.hsm]
type = "pkcs11"
module = {_q(SOFTHSM_MODULE)}
token_label = {_q(token_label)}
pin_file = {_q(str(base / "softhsm" / "pin"))}

[audit]
path = {_q(str(base / "audit" / "audit.jsonl"))}
fsync = false

[federation]
state_dir = {_q(str(base / "state"))}
skew = 300

# This example runs everything as one user: that user may sign, verify and
# manage trusted peer keys, in every tenant.
[[policy.rules]]
name = "example"
uids = [{os.getuid()}]
tenants = ["*"]
operations = [{ops}]
"""


def start(name: str, base: Path, bootstrap: list[str], *, wait: float = 30.0) -> Daemon:
    """A signerd for one side, with its own token (label ``NAME-token``), ready to serve."""
    base.mkdir(parents=True, exist_ok=True)
    label = f"{name}-token"
    made = subprocess.run(
        [str(ROOT / "softhsm" / "make-token.sh"), str(base / "softhsm"), label],
        check=True,
        capture_output=True,
        text=True,
    )
    softhsm_conf = made.stdout.strip().split("=", 1)[1]
    config = base / "signerd.toml"
    config.write_text(config_text(base, label, bootstrap))
    socket = base / "run" / "signerd.sock"
    log = base / "signerd.log"
    env = {**os.environ, "SOFTHSM2_CONF": softhsm_conf}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "signerd", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # start() runs on the main thread: the parent is us
        )
    daemon = Daemon(name, base, socket, log, proc)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"signerd ({name}) exited with {proc.returncode}:\n{daemon.log_text()}"
                )
            if socket.exists() and "signerd.ready" in daemon.log_text():
                return daemon
            time.sleep(0.05)
        raise RuntimeError(f"signerd ({name}) was not ready within {wait}s:\n{daemon.log_text()}")
    except BaseException:
        daemon.stop()  # never leave a half-started daemon behind
        raise
