"""The audit forwarder's process, and how the daemon keeps one running.

With a ``[forwarding]`` table the daemon (the supervisor, or the only process)
starts ``signerd --config FILE --forward``: a process of its own that builds the
backend holding the checkpoint key (never in the supervisor: no PKCS#11 session
survives a fork), maps the lag flag the workers read, and runs the ``Forwarder``
over every chain of the run (one per worker) until SIGTERM. A forwarder that dies
is started again (after a short backoff); the workers never wait for it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

from .._config import Config
from ..audit import worker_path
from ..errors import SignerdError
from ..forwarding import Forwarder, LagFlag, LagGate, Signer
from ..workers import set_parent_death_signal
from ._assemble import build_backends, flag_path

__all__ = ["ForwarderProcess", "run_forwarder"]

START_TIMEOUT = 30.0  # seconds the daemon waits for its forwarder before starting the workers

log = logging.getLogger("signerd.forwarding")


def chains_of(config: Config) -> dict[str, tuple[str, str]]:
    """Every chain of the run: its name (the trail file's), path and worker label."""
    path = str(config.audit["path"])
    if config.workers <= 1:
        return {os.path.basename(path): (path, "w0")}
    out = {}
    for n in range(config.workers):
        p = worker_path(path, n)
        out[os.path.basename(p)] = (p, f"w{n}")
    return out


def _signer(config: Config) -> tuple[Signer, str]:
    """Signs with the checkpoint key's active version, through the backend that holds it."""
    assert config.forwarding is not None
    key = config.forwarding.checkpoint_key
    name = config.tenant_backends.get(key.tenant, config.default_backend)
    backend = build_backends(config)[name]

    def sign(payload: bytes) -> tuple[str, bytes]:
        active = backend.describe(key).active
        if active is None:
            raise SignerdError("the checkpoint key has no active version")
        got = backend.sign(key, active.version, [payload])[0]
        if isinstance(got, SignerdError):
            raise got
        return active.kid, got

    return sign, ""


def run_forwarder(config: Config) -> int:
    """The forwarder process's body: forward until SIGTERM; the exit status."""
    settings = config.forwarding
    if settings is None:
        log.error("signerd.forwarding_not_configured")
        return os.EX_CONFIG
    signer, hint = _signer(config)
    flag = LagFlag(flag_path(config))
    forwarder = Forwarder(settings, chains_of(config), flag, signer, hint)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: forwarder.stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # rotation is followed by the files' identity
    try:
        forwarder.run()
    finally:
        flag.close()
    return os.EX_OK


def _die_with_parent() -> None:
    set_parent_death_signal(signal.SIGTERM)


class ForwarderProcess:
    """Keeps one forwarder process running beside the daemon (``poll`` it now and then)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._due = 0.0
        self._backoff = 0.5
        self._stopped = False

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Before the workers start: a clear flag (not a previous run's), then the forwarder,
        waited for (at most ``timeout``) until it holds the trail files, so that no record
        is written before it follows them. Signs are refused until it does."""
        path = flag_path(self.config)
        os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
        LagFlag.reset(path)
        self.poll()
        gate = LagGate(path, timeout)
        deadline = time.monotonic() + timeout
        while not gate.began() and time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                log.error(
                    "signerd.forwarder_start_failed detail=%s", "signs are refused until it runs"
                )
                return
            time.sleep(0.05)

    def poll(self) -> None:
        if self._stopped:
            return
        if self.proc is not None:
            code = self.proc.poll()
            if code is None:
                return
            log.error("signerd.forwarder_exited code=%d", code)
            self.proc = None
            self._due = time.monotonic() + self._backoff
            self._backoff = min(10.0, self._backoff * 2)
        if time.monotonic() < self._due:
            return
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "signerd", "--config", self.config.path, "--forward"],
            close_fds=True,
            preexec_fn=_die_with_parent,
        )
        log.info("signerd.forwarder_started pid=%d", self.proc.pid)

    def stop(self, grace: float = 10.0) -> None:
        self._stopped = True
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
