"""Callers x tenants x operations against a real daemon, and the audit trail failing under it.

Callers are child processes running as other users (spawned with ``user=``,
``group=``, ``extra_groups=``), each on its own keep-alive connection, so the
daemon identifies them from the kernel exactly as in production.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.audit import verify_file, verify_files
from signerd.wire import from_jwk

from ..conftest import CHILD_PYTHON, PIN_FILE, DaemonProcess, start_daemon, unique
from ..support.rawhttp import Reply, request

pytestmark = pytest.mark.timeout(180)

ALL_OPS = ["sign", "verify", "jwks", "list", "create", "rotate", "promote", "retire", "destroy"]
ADMIN_OPS = ["create", "rotate", "promote", "retire", "destroy"]

CHILD = r"""
import http.client, json, socket, sys

class Conn(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=20)
        self._path = path
    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(self._path)
        self.sock = s

conn = Conn(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    body = None if req["body"] is None else json.dumps(req["body"]).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": req["rid"], **req["headers"]}
    try:
        conn.request(req["method"], req["url"], body=body, headers=headers)
        resp = conn.getresponse()
        out = {"status": resp.status, "body": resp.read().decode()}
    except OSError as exc:
        conn.close()
        out = {"status": 0, "body": str(exc)}
    print(json.dumps(out), flush=True)
"""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class Caller:
    """One identity: a child process as that user, talking over one connection."""

    name: str
    user: str
    group: str
    extra_groups: tuple[str, ...]
    proc: subprocess.Popen[str] | None = None
    uid: int = -1

    def start(self, socket_path: Path) -> None:
        self.proc = subprocess.Popen(
            [CHILD_PYTHON, "-c", CHILD, str(socket_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            user=self.user,
            group=self.group,
            extra_groups=list(self.extra_groups),
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        with open(f"/proc/{self.proc.pid}/status") as status:
            self.uid = int(next(x for x in status if x.startswith("Uid:")).split()[1])

    def ask(
        self, method: str, url: str, body: Any, rid: str, headers: dict[str, str] | None = None
    ) -> Reply:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout
        req = {"method": method, "url": url, "body": body, "rid": rid, "headers": headers or {}}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        return Reply(out["status"], {}, out["body"].encode())

    def stop(self) -> None:
        if self.proc is None:
            return
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --- the matrix ---------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    tenants: frozenset[str] | None  # None: every tenant
    names: frozenset[str] | None  # None: every key name
    ops: frozenset[str]


def model(grants: list[Grant], op: str, tenant: str | None, name: str | None) -> bool:
    """The policy below, written out independently of signerd's implementation."""
    for g in grants:
        if op not in g.ops:
            continue
        if tenant is None:
            if g.tenants is None:
                return True
            continue
        if g.tenants is not None and tenant not in g.tenants:
            continue
        if name is None or g.names is None or name in g.names:
            return True
    return False


class Matrix:
    def __init__(self, d: DaemonProcess, acme: str, globex: str) -> None:
        self.d, self.acme, self.globex = d, acme, globex
        self.callers = {
            "gateway": Caller("gateway", "nobody", "nogroup", ("staff",)),
            "globex-gw": Caller("globex-gw", "bin", "bin", ("staff",)),
            "operator": Caller("operator", "daemon", "daemon", ("staff", "users")),
            "stranger": Caller("stranger", "sys", "sys", ("staff",)),
        }
        self.grants = {
            "gateway": [Grant(frozenset({acme}), frozenset({"feedback"}), frozenset(ALL_OPS[:3]))],
            "globex-gw": [Grant(frozenset({globex}), None, frozenset(ALL_OPS[:3]))],
            "operator": [Grant(None, None, frozenset(["list", "jwks", "verify", *ADMIN_OPS]))],
            "stranger": [],
        }
        self.cells: list[tuple[str, str, str, bool, int]] = []  # rid, caller, op, allowed, status
        self.payloads: list[bytes] = []
        self.signatures: list[str] = []
        self._n = 0

    def root(self, method: str, url: str, body: Any = None, status: int = 200) -> Any:
        reply = request(str(self.d.socket_path), method, url, body)
        assert reply.status == status, reply.body
        return reply.json

    def cell(
        self,
        caller: str,
        op: str,
        tenant: str | None,
        name: str | None,
        method: str,
        url: str,
        body: Any = None,
        ok_status: int = 200,
    ) -> Reply | None:
        """Send one request as caller; assert allowed -> ok_status, else 403. The reply if allowed."""
        self._n += 1
        rid = f"mx-{caller}-{self._n}"
        allowed = model(self.grants[caller], op, tenant, name)
        reply = self.callers[caller].ask(method, url, body, rid)
        where = f"{caller} {op} {tenant}/{name}: {reply.status} {reply.body[:200]!r}"
        if allowed:
            assert reply.status == ok_status, where
        else:
            assert (reply.status, reply.code) == (403, "permission_denied"), where
        self.cells.append((rid, caller, op, allowed, reply.status))
        return reply if allowed else None


ROOT_RULE = {"name": "setup", "uids": [0], "tenants": ["*"], "operations": ALL_OPS}


def matrix_policy(acme: str, globex: str) -> dict[str, Any]:
    return {
        "rules": [
            ROOT_RULE,
            {
                "name": "gateway",
                "users": ["nobody"],
                "tenants": [acme],
                "keys": ["feedback"],
                "operations": ["sign", "verify", "jwks"],
            },
            {
                "name": "globex-gateway",
                "uids": [2],
                "tenants": [globex],
                "operations": ["sign", "verify", "jwks"],
            },
            {
                "name": "operators",
                "groups": ["users"],
                "tenants": ["*"],
                "operations": ["list", "jwks", "verify", *ADMIN_OPS],
            },
        ]
    }


@pytest.fixture
def matrix(shared_tmp: Path) -> Iterator[Matrix]:
    acme, globex = unique("acme"), unique("glob")
    d = start_daemon(
        shared_tmp / "d",
        server={"socket_group": "staff", "socket_mode": "0660"},
        audit={"path": str(shared_tmp / "d" / "audit" / "audit.jsonl"), "fsync": True},
        policy=matrix_policy(acme, globex),
    )
    m = Matrix(d, acme, globex)
    try:
        for caller in m.callers.values():
            caller.start(d.socket_path)
        yield m
    finally:
        for caller in m.callers.values():
            caller.stop()
        assert d.stop() == 0, d.log_text()


def test_callers_tenants_operations(matrix: Matrix) -> None:
    """Every allowed (caller, tenant, key, operation) cell works; every other is 403 and audited."""
    m = matrix
    keys = [(m.acme, "feedback"), (m.acme, "other"), (m.globex, "feedback")]
    public: dict[str, Ed25519PublicKey] = {}
    sigs: dict[str, tuple[str, bytes, str]] = {}
    for tenant, name in keys:
        m.root("POST", "/v1/keys", {"key": f"{tenant}/{name}"}, status=201)
        data = os.urandom(32)
        signed = m.root("POST", "/v1/sign", {"key": f"{tenant}/{name}", "data": b64(data)})
        sigs[f"{tenant}/{name}"] = (signed["kid"], data, signed["signature"])
        m.payloads.append(data)
        m.signatures.append(signed["signature"])
    for jwk in m.root("GET", "/v1/jwks")["keys"]:
        kid, public_key = from_jwk(jwk)
        public[kid] = public_key

    for who in m.callers:
        for tenant, name in keys:
            key = f"{tenant}/{name}"
            data = os.urandom(32)
            m.payloads.append(data)
            reply = m.cell(
                who, "sign", tenant, name, "POST", "/v1/sign", {"key": key, "data": b64(data)}
            )
            if reply is not None:
                out = reply.json
                m.signatures.append(out["signature"])
                public[out["kid"]].verify(base64.b64decode(out["signature"]), data)
            kid, signed_data, signature = sigs[key]
            body = {"kid": kid, "data": b64(signed_data), "signature": signature}
            m.cell(who, "verify", tenant, name, "POST", "/v1/verify", body)
            m.cell(who, "jwks", tenant, name, "GET", f"/v1/kids/{kid}")
            m.cell(who, "list", tenant, name, "GET", f"/v1/keys/{key}")
        for tenant in (m.acme, m.globex):
            reply = m.cell(who, "jwks", tenant, None, "GET", f"/v1/jwks?tenant={tenant}")
            if reply is not None:  # filtered to the keys the caller may see
                shown = {j["kid"].split(".")[1] for j in reply.json["keys"]}
                expect = {n for t, n in keys if t == tenant and model(m.grants[who], "jwks", t, n)}
                assert shown == expect, (who, tenant)
            reply = m.cell(who, "list", tenant, None, "GET", f"/v1/keys?tenant={tenant}")
            if reply is not None:
                assert {k["name"] for k in reply.json["keys"]} == {
                    n for t, n in keys if t == tenant
                }
        m.cell(who, "list", None, None, "GET", "/v1/keys")
        m.cell(who, "jwks", None, None, "GET", "/v1/jwks")

    # a batch may mix keys: each item is judged on its own, and no other tenant's key signs
    data = os.urandom(32)
    m.payloads.append(data)
    items = [
        {"key": f"{m.acme}/feedback", "data": b64(data)},
        {"key": f"{m.globex}/feedback", "data": b64(data)},
    ]
    reply = m.callers["gateway"].ask("POST", "/v1/sign", {"items": items}, "mx-batch")
    results = reply.json["results"]
    assert "signature" in results[0] and results[1]["error"]["code"] == "permission_denied"
    m.signatures.append(results[0]["signature"])

    # admin operations: every other caller tries each step first, then the operator does it
    for tenant in (m.acme, m.globex):
        key = f"{tenant}/{unique('adm')}"
        name = key.split("/")[1]
        steps: list[tuple[str, str, str, dict[str, Any], int]] = [
            ("create", "POST", "/v1/keys", {"key": key}, 201),
            ("rotate", "POST", f"/v1/keys/{key}/rotate", {"pending": True}, 200),
            ("promote", "POST", f"/v1/keys/{key}/versions/2/promote", {}, 200),
            ("retire", "POST", f"/v1/keys/{key}/versions/1/retire", {}, 200),
            ("destroy", "POST", f"/v1/keys/{key}/versions/1/destroy", {"confirm": f"{tenant}.{name}.v1", "now": True}, 200),
        ]  # fmt: skip
        for op, method, url, body, ok in steps:
            for who in ("gateway", "globex-gw", "stranger", "operator"):
                m.cell(who, op, tenant, name, method, url, body, ok_status=ok)
        described = m.root("GET", f"/v1/keys/{key}")
        assert [v["state"] for v in described["versions"]] == ["destroyed", "active"]

    for who in m.callers:  # each caller has both kinds of cells, except the stranger
        kinds = {c[3] for c in m.cells if c[1] == who}
        assert kinds == ({False} if who == "stranger" else {True, False}), who

    # every cell is in the audit trail, with the kernel's view of the caller and the outcome
    m.d.stop()
    by_rid: dict[str, list[dict[str, Any]]] = {}
    for rec in m.d.audit_records():
        by_rid.setdefault(rec["request_id"], []).append(rec)
    for rid, who, op, was_allowed, _status in m.cells:
        caller = m.callers[who]
        assert caller.proc is not None
        final = by_rid[rid][-1]
        assert final["operation"] == op, rid
        assert (final["peer"]["uid"], final["peer"]["pid"]) == (caller.uid, caller.proc.pid), rid
        if was_allowed:
            assert final["outcome"] == "ok" and 200 <= final["status"] < 300, rid
        else:
            assert (final["outcome"], final["status"]) == ("permission_denied", 403), rid
            assert final["reason"], rid
            assert len(by_rid[rid]) == 1, rid  # refused before any attempt record
    assert by_rid["mx-batch"][-1]["outcome"] == "partial:1/2"
    for path in m.d.audit_files():  # each worker's file is a chain of its own
        report = verify_file(str(path))
        assert report.ok, report

    # no secret or signed data in the audit trail or the logs
    text = m.d.audit_bytes() + m.d.log_path.read_bytes()
    pin = PIN_FILE.read_text().strip().encode()
    assert pin and pin not in text
    for data in m.payloads:
        assert data not in text and b64(data).encode() not in text
    for signature in m.signatures:
        assert signature.encode() not in text


# --- the audit trail failing under a running daemon -----------------------------------


def swap_link(link: Path, target: str) -> None:
    temp = link.with_name(link.name + ".new")
    temp.symlink_to(target)
    os.replace(temp, link)


@contextlib.contextmanager
def loop_fs(base: Path) -> Iterator[Path]:
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(8 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], capture_output=True)
        for _ in range(100):
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def test_idempotency_keys_are_each_callers_own(matrix: Matrix) -> None:
    """An Idempotency-Key is scoped by the caller's uid: another uid's request with the same key
    acts for itself (no replay of root's answer, no 422), and replays only its own answer."""
    m = matrix
    key = f"{m.acme}/{unique('idem')}"
    m.root("POST", "/v1/keys", {"key": key}, status=201)
    idem = {"Idempotency-Key": unique("shared")}
    url = f"/v1/keys/{key}/rotate"
    root = request(str(m.d.socket_path), "POST", url, {}, headers=idem)
    assert root.status == 200 and root.json["kid"].endswith(".v2")
    operator = m.callers["operator"]
    mine = operator.ask("POST", url, {}, "idem-op-1", idem)
    assert mine.status == 200 and mine.json["kid"].endswith(".v3"), mine.body
    again = operator.ask("POST", url, {}, "idem-op-2", idem)
    assert again.status == 200 and again.json == mine.json
    other = operator.ask("POST", url, {"pending": True}, "idem-op-3", idem)
    assert (other.status, other.code) == (422, "idempotency_key_reused")
    replay = request(str(m.d.socket_path), "POST", url, {}, headers=idem)
    assert replay.json == root.json and replay.headers["idempotent-replayed"] == "true"
    versions = m.root("GET", f"/v1/keys/{key}")["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]


@pytest.mark.parametrize(
    "fault", ["dev-full", "fifo-without-reader", "immutable-file", "frozen-fs"]
)
def test_audit_fault_refuses_signing(tmp_path: Path, fault: str) -> None:
    """While the audit sink fails, sign and admin answer 503 audit_unavailable within 1 s and
    nothing is signed; health stays responsive; it recovers on its own when the sink does."""
    with contextlib.ExitStack() as stack:
        audit_dir = tmp_path / "audit"
        audit_dir.mkdir()
        first, second = audit_dir / "one.jsonl", audit_dir / "two.jsonl"
        path = audit_dir / "audit.jsonl"
        if fault == "frozen-fs":
            mnt = stack.enter_context(loop_fs(tmp_path))
            first = path = mnt / "audit.jsonl"
        elif fault == "immutable-file":
            path = first
        else:
            path.symlink_to(first)
        d = start_daemon(
            tmp_path / "d",
            server={"workers": 1},
            audit={"path": str(path), "fsync": True, "write_timeout": 0.5},
        )
        stack.callback(d.stop)
        sock = str(d.socket_path)

        def call(
            method: str, url: str, body: Any = None, rid: str | None = None
        ) -> tuple[Reply, float]:
            started = time.monotonic()
            reply = request(sock, method, url, body, headers={"X-Request-Id": rid} if rid else None)
            return reply, time.monotonic() - started

        key = f"{unique('fault')}/feedback"
        assert call("POST", "/v1/keys", {"key": key})[0].status == 201
        data = os.urandom(32)
        signed, _ = call("POST", "/v1/sign", {"key": key, "data": b64(data)})
        assert signed.status == 200

        if fault == "dev-full":
            swap_link(path, "/dev/full")
        elif fault == "fifo-without-reader":
            fifo = audit_dir / "pipe"
            os.mkfifo(fifo)
            swap_link(path, str(fifo))
        elif fault == "immutable-file":
            subprocess.run(["chattr", "+i", str(first)], check=True)
            stack.callback(subprocess.run, ["chattr", "-i", str(first)])
        else:
            subprocess.run(["fsfreeze", "--freeze", str(mnt)], check=True)
            stack.callback(subprocess.run, ["fsfreeze", "--unfreeze", str(mnt)])

        refused: list[str] = []
        secret = os.urandom(32)
        for i in range(4):
            rid = f"fault-sign-{i}"
            reply, took = call("POST", "/v1/sign", {"key": key, "data": b64(secret)}, rid)
            assert (reply.status, reply.code) == (503, "audit_unavailable"), reply.body
            assert b"signature" not in reply.body
            assert took < 1.0, f"refused after {took:.3f}s"
            refused.append(rid)
            health, took = call("GET", "/v1/health")
            assert health.status == 200 and took < 0.3, took
        reply, took = call("POST", f"/v1/keys/{key}/rotate", {}, "fault-rotate")
        assert (reply.status, reply.code) == (503, "audit_unavailable") and took < 1.0
        refused.append("fault-rotate")
        verified, _ = call(
            "POST", "/v1/verify", {"kid": signed.json["kid"], "data": b64(data), "signature": signed.json["signature"]}
        )  # fmt: skip
        assert verified.status == 200  # verification is not refused for want of a record

        if fault in ("dev-full", "fifo-without-reader"):
            swap_link(path, str(second))
        elif fault == "immutable-file":
            subprocess.run(["chattr", "-i", str(first)], check=True)
        else:
            subprocess.run(["fsfreeze", "--unfreeze", str(mnt)], check=True)
        deadline = time.monotonic() + 5
        while True:
            reply, _ = call("POST", "/v1/sign", {"key": key, "data": b64(data)}, "fault-after")
            if reply.status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert reply.status == 200, reply.body
        described, _ = call("GET", f"/v1/keys/{key}")
        assert described.json["active_kid"] == signed.json["kid"]  # the refused rotate did nothing
        assert d.stop() == 0, d.log_text()

        files = [first, second] if second.exists() else [first]
        report = verify_files([str(f) for f in files])
        assert report.ok, report
        recs = [json.loads(x) for f in files for x in f.read_bytes().splitlines()]
        unacked = {s for r in recs for s in r.get("unacknowledged", [])}
        for rec in recs:
            if rec["request_id"] in refused and rec["outcome"] == "ok":
                assert rec["seq"] in unacked, rec  # landed late; marked as refused
        text = b"".join(f.read_bytes() for f in files) + d.log_path.read_bytes()
        assert secret not in text and b64(secret).encode() not in text
        audit_key = bytes.fromhex((path.parent / "audit.key").read_text())  # the keyed hash is kept
        assert (
            hmac.new(audit_key, hashlib.sha256(data).digest(), "sha256").hexdigest().encode()
            in text
        )
