"""Wire manners of the llhttp server and the client's side of a full backlog.

405 with ``Allow``, HEAD, unknown methods, pipelining, chunked bodies, 413,
``Expect: 100-continue``; the ``SOMAXCONN`` backlog, and a sync client that
waits for it; routes added through ``add_routes`` see the request subset.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd import Client, TooManyConnections
from signerd.client import ConnectionFailed
from signerd.client._transport import UnixHTTPConnection

from ..conftest import DaemonProcess, OpenGate, start_daemon, unique

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path_factory.mktemp("wire") / "d", server={"keepalive_timeout": 2.0})
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]


def _full_listener(path: str) -> tuple[socket.socket, list[socket.socket]]:
    """A listener with backlog 0, filled until connect answers EAGAIN."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    fillers: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(path)
        except BlockingIOError:
            s.close()
            return listener, fillers
        fillers.append(s)
        assert len(fillers) < 100


def test_sync_client_waits_for_a_full_backlog(tmp_path: Path) -> None:
    """connect() retries EAGAIN from a full backlog within its timeout instead of failing at once."""
    listener, fillers = _full_listener(str(tmp_path / "a.sock"))
    accepted: list[socket.socket] = []
    try:
        timer = threading.Timer(
            0.5, lambda: accepted.extend(listener.accept()[0] for _ in range(len(fillers) + 1))
        )
        timer.start()
        conn = UnixHTTPConnection(str(tmp_path / "a.sock"), timeout=5.0)
        started = time.monotonic()
        conn.connect()
        assert 0.3 < time.monotonic() - started < 5.0
        conn.close()
        timer.join()
    finally:
        for s in fillers + accepted:
            s.close()
        listener.close()


def test_sync_client_gives_up_on_a_backlog_that_stays_full(tmp_path: Path) -> None:
    """A backlog nobody drains ends in TimeoutError at the timeout, not a hang or an instant failure."""
    listener, fillers = _full_listener(str(tmp_path / "b.sock"))
    try:
        conn = UnixHTTPConnection(str(tmp_path / "b.sock"), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            conn.connect()
        assert 0.25 < time.monotonic() - started < 2.0
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_four_hundred_clients_at_once_all_succeed(tmp_path: Path) -> None:
    """400 clients started at once (fresh connections, a uid cap that allows them) all get their answer."""
    daemon = start_daemon(tmp_path / "d", server={"max_connections_per_uid": 512})
    key = f"{unique('bk')}/k"
    with Client(daemon.socket_path) as admin:
        admin.create_key(key)
    gate = threading.Barrier(400)
    failures: list[BaseException] = []

    def one() -> None:
        client = Client(daemon.socket_path, timeout=30)
        gate.wait()
        try:
            client.sign(key, b"at once")
        except BaseException as exc:
            failures.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=one) for _ in range(400)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join(60)
    finally:
        assert daemon.stop() == 0
    assert not failures, failures[:3]


def _exchange(
    path: Path, data: bytes, answers: int = 1, timeout: float = 5.0, head_only: bool = False
) -> list[bytes]:
    """Send raw bytes on one connection; return that many whole answers (head + body)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    s.sendall(data)
    buf, out = b"", list[bytes]()
    try:
        while len(out) < answers:
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                buf += chunk
            head, rest = buf.split(b"\r\n\r\n", 1)
            if head.startswith(b"HTTP/1.1 100"):
                buf = rest
                out.append(head)
                continue
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            length = 0 if head_only else length
            while len(rest) < length:
                chunk = s.recv(65536)
                if not chunk:
                    return out
                rest += chunk
            out.append(head + b"\r\n\r\n" + rest[:length])
            buf = rest[length:]
        return out
    finally:
        s.close()


def test_http_manners(daemon: DaemonProcess) -> None:
    """405 carries Allow; HEAD is 405 too; unknown methods 400; pipelined and chunked requests work."""
    path = daemon.socket_path
    (answer,) = _exchange(path, b"DELETE /v1/sign HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405") and b"\r\nAllow: POST\r\n" in answer
    (answer,) = _exchange(path, b"HEAD /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
    assert answer.startswith(b"HTTP/1.1 405") and b"\r\nAllow: GET\r\n" in answer
    (answer,) = _exchange(path, b"BREW /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400") and b"Connection: close" in answer
    two = _exchange(path, b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n" * 2, answers=2)
    assert [a[:12] for a in two] == [b"HTTP/1.1 200"] * 2
    key = f"{unique('ch')}/k"
    with Client(path) as client:
        client.create_key(key)
    body = json.dumps({"key": key, "data": "YQ=="}).encode()
    chunked = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7]) for i in range(0, len(body), 7)
    )
    head = b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    (answer,) = _exchange(
        path, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked + b"0\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200") and b'"signature"' in answer
    big = b"1000\r\n" + b" " * 4096 + b"\r\n"
    (answer,) = _exchange(
        path, head + b"Transfer-Encoding: chunked\r\n\r\n" + big * 300 + b"0\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer
    cont, answer = _exchange(
        path,
        head + b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        answers=2,
    )
    assert cont.startswith(b"HTTP/1.1 100") and answer.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize("route", ["/v1/keys", "/v1/jwks", "/v1/trusted-keys"])
def test_empty_repeated_or_undecodable_query_is_a_400(daemon: DaemonProcess, route: str) -> None:
    """tenant= / bare tenant / tenant twice / non-UTF-8 is 400 invalid_request, never all tenants."""
    path = daemon.socket_path
    for query in (b"tenant=", b"tenant", b"tenant=a&tenant=b", b"tenant=a&tenant=", b"tenant=%ff"):
        (answer,) = _exchange(
            path, b"GET %s?%s HTTP/1.1\r\nHost: x\r\n\r\n" % (route.encode(), query)
        )
        head, body = answer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 400"), (query, answer)
        assert json.loads(body)["error"]["code"] == "invalid_request", (query, body)
        assert b"%ff" not in body and b"tenant=a" not in body
    for query in (b"tenant=acme", b"tenant=acme&", b""):
        (answer,) = _exchange(
            path, b"GET %s?%s HTTP/1.1\r\nHost: x\r\n\r\n" % (route.encode(), query)
        )
        assert answer.startswith(b"HTTP/1.1 200"), (query, answer)


async def test_extra_routes_see_the_request_subset() -> None:
    """Server.add_routes: extra handlers get match_info, query, headers, body, peer; 404/405 as usual."""
    from signerd.audit import AuditEvent
    from signerd.authz import Operation, Peer
    from signerd.server import Front, Request, RequestContext, Response, json_response

    class Sink:
        events: list[AuditEvent] = []

        async def record(self, event: AuditEvent) -> None:
            self.events.append(event)

    seen: dict[str, Any] = {}

    async def handler(ctx: RequestContext) -> Response:
        request = ctx.request
        seen.update(
            match=dict(request.match_info),
            tenant=request.query.get("tenant"),
            ctype=request.content_type,
            header=request.headers.get("x-thing"),
            body=await request.read(),
            can_read=request.can_read_body,
            rid=ctx.rid,
        )
        return json_response({"ok": True}, status=201, headers={"X-Extra": "1"})

    front = Front(gate=OpenGate(), audit=Sink(), peer_lookup=lambda sock: Peer(1, 2, 3))
    front.add_routes([("POST", "/v1/things/{tenant}/{kid}/retire", handler, Operation.VERIFY)])

    def req(method: str, url: bytes, body: bytes = b"") -> Request:
        r = Request(
            method=method,
            raw_url=url,
            raw_headers=[(b"Content-Type", b"application/json; charset=utf-8"), (b"X-Thing", b"v")],
            keep_alive=True,
        )
        r.buffer += body
        r.has_body = r.complete = bool(body)
        return r

    answer = await front.dispatch(req("POST", b"/v1/things/acme/a%2Fb.v1/retire?tenant=t1", b"{}"))
    assert answer.status == 201 and answer.headers["X-Extra"] == "1"
    assert seen["match"] == {"tenant": "acme", "kid": "a/b.v1"}
    assert (seen["tenant"], seen["ctype"], seen["header"]) == ("t1", "application/json", "v")
    assert (seen["body"], seen["can_read"]) == (b"{}", True)
    assert answer.headers["X-Request-Id"] == seen["rid"]
    assert [e.operation for e in Sink.events] == ["verify"]
    answer = await front.dispatch(req("GET", b"/v1/things/acme/k/retire"))
    assert answer.status == 405 and answer.headers["Allow"] == "POST"
    answer = await front.dispatch(req("POST", b"/v1/things/acme/retire"))
    assert answer.status == 404


def test_listen_backlog_is_the_system_maximum(daemon: DaemonProcess) -> None:
    """With the daemon stopped, somaxconn + 1 connections queue before EAGAIN (not 129: listen(128))."""
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    queued: list[socket.socket] = []
    pids = daemon.worker_pids() | {daemon.proc.pid}  # every process that accepts
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        while len(queued) <= somaxconn + 10:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(daemon.socket_path))
            except BlockingIOError:
                s.close()
                break
            queued.append(s)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for s in queued:
            s.close()
    assert len(queued) == somaxconn + 1
    # the workers first accept (and count against the uid's cap) the closed queued ones
    deadline = time.monotonic() + 10
    while True:
        try:
            with Client(daemon.socket_path, timeout=10) as client:
                assert client.health() == "ok"
            break
        except (ConnectionFailed, TooManyConnections):  # reset, or answered over the cap
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
