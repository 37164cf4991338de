"""Two signerd "hosts" on one OpenBao raft cluster (and one Redis), and a steady load.

A host is a daemon with its own socket, configuration, audit trail, workers
and OpenBao token (the least-privilege policy of docs/many-hosts.md).
``Load`` signs at a steady rate from threads and records every answer with
its start and end times, for the failover tests and the benchmark.
"""

from __future__ import annotations

import base64
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..conftest import DaemonProcess, start_daemon
from .openbao import RaftCluster, vault_backend_config
from .rawhttp import request

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "many-hosts.md"
HOST_POLICY = "signerd-host"


def host_policy() -> str:
    """The per-host OpenBao policy, as docs/many-hosts.md prints it."""
    blocks = re.findall(r"```hcl\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1, "docs/many-hosts.md has one hcl block: the host policy"
    return str(blocks[0])


def host_token(cluster: RaftCluster) -> str:
    """A periodic token of its own for one host, under the host policy."""
    leader = cluster.leader()
    leader.write_policy(HOST_POLICY, host_policy())
    answer = leader.api(
        "POST", "auth/token/create-orphan", {"policies": [HOST_POLICY], "period": "1h"}
    )
    return str(answer["auth"]["client_token"])


def start_host(
    base: Path,
    cluster: RaftCluster,
    *,
    refresh_interval: float = 1.0,
    workers: int = 2,
    federation: dict[str, Any] | None = None,
    addrs: list[str] | None = None,
) -> DaemonProcess:
    """One host: its own token, socket, trail and workers, every node of the cluster listed."""
    backend = vault_backend_config(
        cluster.nodes[0], token=host_token(cluster), addr=addrs or cluster.addrs
    )
    overrides: dict[str, Any] = {
        "keys": {
            "default_backend": "bao",
            "refresh_interval": refresh_interval,
            "backend_timeout": 5.0,
        },
        "backends": {"bao": backend},
        "server": {"workers": workers},
    }
    if federation is not None:
        overrides["federation"] = {"state_dir": str(base / "state"), **federation}
    return start_daemon(base, **overrides)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def transit_name(key: str) -> str:
    tenant, name = key.split("/")
    return f"signerd-{tenant}.{name}"


def public_keys(cluster: RaftCluster, key: str) -> dict[int, Ed25519PublicKey]:
    """Every version's public key, as transit (the leader) knows them."""
    data = cluster.leader().transit_key(transit_name(key))
    return {
        int(v): Ed25519PublicKey.from_public_bytes(base64.b64decode(k["public_key"]))
        for v, k in data["keys"].items()
    }


def version_of(kid: str) -> int:
    return int(kid.rsplit(".v", 1)[1])


@dataclass
class Answer:
    host: str
    started: float
    ended: float
    status: int
    code: str | None
    retry_after: str | None
    kid: str | None
    data: bytes
    signature: bytes | None


def sign(host: str, sock: str, key: str, data: bytes) -> Answer:
    started = time.monotonic()
    try:
        reply = request(sock, "POST", "/v1/sign", {"key": key, "data": b64(data)}, timeout=30)
    except OSError as exc:  # the daemon did not answer at all: a failure like any other
        return Answer(
            host, started, time.monotonic(), 0, type(exc).__name__, None, None, data, None
        )
    ended = time.monotonic()
    kid = signature = None
    if reply.status == 200:
        body = reply.json
        kid, signature = str(body["kid"]), base64.b64decode(body["signature"])
    return Answer(
        host,
        started,
        ended,
        reply.status,
        reply.code,
        reply.headers.get("retry-after"),
        kid,
        data,
        signature,
    )


@dataclass
class Load:
    """Threads signing ``key`` through each host at ``rate`` requests a second per thread."""

    hosts: dict[str, DaemonProcess]
    key: str
    threads: int = 3
    rate: float = 25.0
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Load:
        for name, daemon in self.hosts.items():
            for i in range(self.threads):
                t = threading.Thread(
                    target=self._run, args=(name, str(daemon.socket_path), i), daemon=True
                )
                t.start()
                self._workers.append(t)
        return self

    def _run(self, host: str, sock: str, index: int) -> None:
        gap = 1.0 / self.rate
        due = time.monotonic()
        n = 0
        while not self._stop.is_set():
            n += 1
            answer = sign(
                host, sock, self.key, f"{host}-{index}-{n}-{os.urandom(4).hex()}".encode()
            )
            with self._lock:
                self.answers.append(answer)
            due = max(due + gap, time.monotonic() - gap)
            self._stop.wait(max(0.0, due - time.monotonic()))

    def stop(self) -> list[Answer]:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=60)
        with self._lock:
            return list(self.answers)


def check_signatures(answers: list[Answer], keys: dict[int, Ed25519PublicKey]) -> None:
    """Every 200 carries a kid whose version's public key verifies its signature."""
    for a in answers:
        if a.status != 200:
            continue
        assert a.kid is not None and a.signature is not None
        public = keys[version_of(a.kid)]
        try:
            public.verify(a.signature, a.data)
        except InvalidSignature as exc:  # pragma: no cover - the failure being tested for
            raise AssertionError(f"{a.host}: {a.kid} did not sign {a.data!r}") from exc
