"""Nothing a caller sends is echoed into answers, logs or the audit trail; strangers are cut short.

The stranger runs as ``nobody`` (no rule of the policy matches it); root is
granted everything. A marker string inside the hostile input is searched for
in every answer, the log and the audit file.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ._rawhttp import request
from .conftest import DaemonProcess, policy_allow_all, start_daemon, unique

pytestmark = pytest.mark.timeout(180)

CHILD_PYTHON = "/usr/bin/python3"
STRANGER = {"user": "nobody", "group": "nogroup", "extra_groups": ["staff"]}

# Sends each request (base64 of raw bytes) on one keep-alive connection; reads one
# answer each (head + Content-Length body); prints [[status, body], ...].
SENDER = r"""
import base64, json, socket, sys, time
path, reqs = sys.argv[1], json.loads(sys.stdin.read())
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
buf, out = b"", []
for r in reqs:
    started = time.monotonic()
    try:
        s.sendall(base64.b64decode(r))
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise OSError("closed")
            buf += chunk
        head, buf = buf.split(b"\r\n\r\n", 1)
        length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
        while len(buf) < length:
            buf += s.recv(65536)
        body, buf = buf[:length], buf[length:]
        out.append([int(head.split(b" ")[1]), body.decode(), round(time.monotonic() - started, 3)])
    except OSError as exc:
        out.append([0, str(exc), 0])
        break
print(json.dumps(out))
"""


def http_post(url: str, body: bytes, *, length: int | None = None) -> bytes:
    n = len(body) if length is None else length
    return (
        f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {n}\r\n\r\n"
    ).encode() + body


def as_stranger(d: DaemonProcess, reqs: list[bytes]) -> list[tuple[int, str, float]]:
    out = subprocess.run(
        [CHILD_PYTHON, "-c", SENDER, str(d.socket_path)],
        input=json.dumps([base64.b64encode(r).decode() for r in reqs]),
        capture_output=True,
        text=True,
        timeout=60,
        **STRANGER,  # type: ignore[call-overload]
    )
    assert out.returncode == 0, out.stderr
    return [(s, b, t) for s, b, t in json.loads(out.stdout)]


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    base = Path(tempfile.mkdtemp(prefix="signerd-amp-", dir="/tmp"))
    base.chmod(0o755)
    policy: dict[str, Any] = {**policy_allow_all(), "unmatched_rate": 0.5, "unmatched_burst": 10}
    d = start_daemon(
        base / "d",
        server={"socket_group": "staff", "socket_mode": "0660"},
        policy=policy,
    )
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log_text()[-2000:]
        shutil.rmtree(base, ignore_errors=True)


def _records(d: DaemonProcess) -> list[dict[str, Any]]:
    return d.audit_records()


def _audit_size(d: DaemonProcess) -> int:
    return sum(p.stat().st_size for p in d.audit_files())


def test_huge_field_name_from_a_stranger_is_refused_before_parsing(daemon: DaemonProcess) -> None:
    """{"<1 MiB name>": 1} from a uid with no grant: 403 before the body is read; audit grows < 2 KB."""
    mark = "AMPMARK" + unique()
    name = (mark * (1 << 20))[: (1 << 20) - 100]
    body = json.dumps({name: 1}).encode()
    before = _audit_size(daemon)
    ((status, text, _),) = as_stranger(daemon, [http_post("/v1/sign", body)])
    assert status == 403 and json.loads(text)["error"]["code"] == "permission_denied"
    assert mark not in text
    assert _audit_size(daemon) - before < 2048
    assert mark.encode() not in daemon.audit_bytes()
    assert mark not in daemon.log_text()


def test_stranger_is_answered_without_sending_its_body(daemon: DaemonProcess) -> None:
    """A stranger's head announcing 1 MiB is answered 403 at once, with no body byte sent."""
    ((status, text, took),) = as_stranger(daemon, [http_post("/v1/sign", b"", length=1 << 20)])
    assert (status, json.loads(text)["error"]["code"]) == (403, "permission_denied")
    assert took < 1.0


def test_open_routes_stay_open_to_strangers(daemon: DaemonProcess) -> None:
    """health, ready and the OpenAPI document answer a uid with no grant."""
    get = [
        f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        for p in ("/v1/health", "/v1/ready", "/v1/openapi.json")
    ]
    assert [s for s, _, _ in as_stranger(daemon, get)] == [200, 200, 200]


def test_strangers_are_rate_limited_and_their_audit_bounded(daemon: DaemonProcess) -> None:
    """Past its bucket (burst 10) a stranger gets 429, and its 429s are audited about once a second."""
    before = len(_records(daemon))
    reqs = [http_post("/v1/verify", b'{"kid": "a.b.v1", "data": "", "signature": ""}')] * 200
    answers = as_stranger(daemon, reqs)
    statuses = [s for s, _, _ in answers]
    assert statuses[:10] == [403] * 10
    assert statuses.count(429) >= 180
    assert all(json.loads(b)["error"]["code"] == "rate_limited" for s, b, _ in answers if s == 429)
    records = _records(daemon)[before:]
    ours = [r for r in records if r["peer"]["uid"] == 65534]
    assert len([r for r in ours if r["outcome"] == "permission_denied"]) == 10
    limited = [r for r in ours if r["outcome"] == "rate_limited"]
    assert 1 <= len(limited) <= 6, len(limited)  # one per second, not one per request


def test_granted_caller_errors_do_not_echo(daemon: DaemonProcess) -> None:
    """Unknown and duplicate field names from a granted caller: typed 400s without the caller's text."""
    mark = "ECHO~MARK" + unique()  # "~": never valid base64, so "data": mark is always refused
    sock = str(daemon.socket_path)
    before = _audit_size(daemon)
    bodies = [
        json.dumps({mark * 1000: 1}).encode(),
        b'{"key": "a/b", "' + mark.encode() + b'": 1, "' + mark.encode() + b'": 2}',
        json.dumps({"key": mark, "data": "YQ=="}).encode(),
        json.dumps({"key": "a/b", "data": mark}).encode(),
        json.dumps({"items": [{"key": "a/b", "data": "YQ==", mark: 1}]}).encode(),
    ]
    for raw in bodies:
        reply = request(sock, "POST", "/v1/sign", raw=raw)
        assert reply.status == 400, reply.body
        assert mark.encode() not in reply.body
    reply = request(
        sock,
        "POST",
        f"/v1/keys/{mark[:20].lower().replace('~', '')}/x/versions/%C2%B2/retire",
        raw=b"{}",
    )
    assert (reply.status, reply.code) == (404, "unknown_version")
    audit = daemon.audit_bytes()
    assert mark.encode() not in audit and mark not in daemon.log_text()
    assert len(audit) - before < 6 * 1024


def test_unknown_field_message_names_our_fields(daemon: DaemonProcess) -> None:
    """The unknown-field message lists the fields the request takes, never the one sent."""
    reply = request(str(daemon.socket_path), "POST", "/v1/keys", raw=b'{"zzz": 1}')
    assert (reply.status, reply.code) == (400, "invalid_request")
    message = reply.json["error"]["message"]
    assert "zzz" not in message and "key" in message


def test_unmatched_bucket_is_configurable() -> None:
    """policy.unmatched_rate and unmatched_burst are validated and used; defaults are 1/s and 60."""
    from signerd._authz import policy_from_config

    policy = policy_from_config({"rules": [], "unmatched_rate": 2.5, "unmatched_burst": 7})
    assert (policy.unmatched_rate, policy.unmatched_burst) == (2.5, 7)
    default = policy_from_config({"rules": []})
    assert (default.unmatched_rate, default.unmatched_burst) == (1.0, 60)
    for bad in ({"unmatched_rate": 0}, {"unmatched_burst": 0}, {"unmatched_rate": "x"}):
        with pytest.raises(ValueError, match=r"policy\.unmatched_"):
            policy_from_config({"rules": [], **bad})


async def test_ready_is_one_backend_check_per_second() -> None:
    """200 concurrent /v1/ready share one backend check; a failure is shared too, then rechecked."""
    import asyncio

    from signerd._calls import Peer
    from signerd._request import Request
    from signerd._server import Server
    from signerd.errors import BackendUnavailable

    class Keys:
        calls = 0
        fail = False

        async def ready(self) -> None:
            Keys.calls += 1
            await asyncio.sleep(0.05)
            if Keys.fail:
                raise BackendUnavailable()

    class Gate:
        def authorize(self, call: Any) -> None: ...

        def visible(self, *args: Any) -> bool:
            return True

        def admits(self, peer: Peer) -> bool:
            return False  # a stranger: ready stays open anyway

    class Sink:
        async def record(self, event: Any) -> None: ...

    server = Server(Keys(), gate=Gate(), audit=Sink(), peer_lookup=lambda s: Peer(1, 2, 3))  # type: ignore[arg-type]

    def ready() -> Request:
        return Request(
            method="GET", raw_url=b"/v1/ready", raw_headers=[], keep_alive=True, connection=None
        )

    answers = await asyncio.gather(*(server.dispatch(ready()) for _ in range(200)))
    assert [a.status for a in answers] == [200] * 200 and Keys.calls == 1
    Keys.fail = True
    await asyncio.sleep(1.05)
    answers = await asyncio.gather(*(server.dispatch(ready()) for _ in range(50)))
    assert [a.status for a in answers] == [503] * 50 and Keys.calls == 2
