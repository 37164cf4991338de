"""Nothing a caller sends is echoed into answers, logs or the audit trail; strangers are cut short.

The stranger runs as ``nobody`` (no rule of the policy matches it); root is
granted everything. A marker string inside the hostile input is searched for
in every answer, the log and the audit file.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import CHILD_PYTHON, DaemonProcess, policy_allow_all, start_daemon, unique
from ..support.rawhttp import request

pytestmark = pytest.mark.timeout(180)

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
def daemon(shared_tmp: Path) -> Iterator[DaemonProcess]:
    base = shared_tmp
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
    from signerd.authz import policy_from_config

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

    from signerd.authz import Peer
    from signerd.errors import BackendUnavailable
    from signerd.keys._service import KeyService
    from signerd.server import Request, Server

    class Keys:  # the backend: only check (and close) are called
        calls = 0
        fail = False
        max_concurrency = 1

        def check(self) -> None:
            Keys.calls += 1
            time.sleep(0.05)
            if Keys.fail:
                raise BackendUnavailable()

        def close(self) -> None: ...

    class Gate:
        def authorize(self, call: Any) -> None: ...

        def visible(self, *args: Any) -> bool:
            return True

        def admits(self, peer: Peer) -> bool:
            return False  # a stranger: ready stays open anyway

    class Sink:
        async def record(self, event: Any) -> None: ...

    keys = KeyService({"b": Keys()}, default_backend="b")  # type: ignore[dict-item]
    server = Server(keys, gate=Gate(), audit=Sink(), peer_lookup=lambda s: Peer(1, 2, 3))  # type: ignore[arg-type]

    def ready() -> Request:
        return Request(method="GET", raw_url=b"/v1/ready", raw_headers=[], keep_alive=True)

    answers = await asyncio.gather(*(server.dispatch(ready()) for _ in range(200)))
    assert [a.status for a in answers] == [200] * 200 and Keys.calls == 1
    Keys.fail = True
    await asyncio.sleep(1.05)
    answers = await asyncio.gather(*(server.dispatch(ready()) for _ in range(50)))
    assert [a.status for a in answers] == [503] * 50 and Keys.calls == 2
    await keys.close()


# --- refusals of callers some rule matches: the trail's growth under a flood ---------------

# Sends the requests (hex of raw bytes) round robin on one keep-alive connection for SECONDS;
# prints {"status": count, ...} of the answers.
FLOODER = r"""
import json, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
reqs = [bytes.fromhex(x) for x in json.loads(sys.stdin.read())]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(path)
buf, counts, i = b"", {}, 0
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    s.sendall(reqs[i % len(reqs)])
    i += 1
    while b"\r\n\r\n" not in buf:
        buf += s.recv(65536)
    head, buf = buf.split(b"\r\n\r\n", 1)
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:")][0])
    while len(buf) < length:
        buf += s.recv(65536)
    buf = buf[length:]
    status = head.split(b" ")[1].decode()
    counts[status] = counts.get(status, 0) + 1
print(json.dumps(counts))
"""

#: docs/security.md, "Audit bytes per uid per second": a record is at most 2 KiB, plus 11 bytes per
#: supplementary group of the caller
RECORD_BYTES = 2048
GROUP_BYTES = 11


def _flood(d: DaemonProcess, who: dict[str, Any], seconds: float) -> Any:
    return subprocess.Popen(
        [CHILD_PYTHON, "-c", FLOODER, str(d.socket_path), str(seconds)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **who,
    )


def test_refusal_floods_from_matched_callers_are_bounded(shared_tmp: Path) -> None:
    """256-item refused batches and bad bodies for 5 s from a rate-limited uid and a uid that only
    a users=["*"] rule matches (2 workers): 429s, and each uid's records stay within the bound."""
    from signerd.authz import DEFAULT_REFUSAL_BURST, DEFAULT_REFUSAL_RATE

    base = shared_tmp
    mine, other = unique("mine"), unique("othr")
    policy: dict[str, Any] = policy_allow_all()
    policy["rules"] += [
        {"name": "gw", "uids": [65534], "tenants": [mine], "keys": ["k"],
         "operations": ["sign", "verify"], "rate": 50, "burst": 100},
        {"name": "public-keys", "users": ["*"], "tenants": [mine], "operations": ["jwks"]},
    ]  # fmt: skip
    d = start_daemon(
        base / "d",
        server={"socket_group": "staff", "socket_mode": "0660", "workers": 2},
        policy=policy,
    )
    try:
        data = base64.b64encode(b"payload").decode()
        batch = json.dumps(
            {"items": [{"key": f"{other}/k{i}", "data": data} for i in range(256)]}
        ).encode()
        reqs = [
            http_post("/v1/sign", batch),
            http_post("/v1/sign", b'{"items": 5}'),  # 400 before any grant
            http_post("/v1/sign", batch),
            http_post("/v1/verify", b'{"kid": "x", "data": "", "signature": ""}'),  # 404
        ]
        payload = json.dumps([r.hex() for r in reqs])
        gateway = {"user": "nobody", "group": "nogroup", "extra_groups": ["staff"]}
        anyone = {"user": "daemon", "group": "daemon", "extra_groups": ["staff"]}
        seconds = 5.0
        started = time.time()
        procs = [_flood(d, who, seconds) for who in (gateway, gateway, anyone, anyone)]
        for proc in procs:  # all four start flooding at once
            assert proc.stdin is not None
            proc.stdin.write(payload)
            proc.stdin.close()
        outs = [(p.stdout.read(), p.stderr.read(), p.wait(timeout=60)) for p in procs]
        elapsed = time.time() - started
        assert all(code == 0 for _, _, code in outs), outs
        counts = [json.loads(o) for o, _, _ in outs]
        assert d.stop() == 0, d.log_text()[-2000:]  # every queued record is written

        for uid, mine_counts in ((65534, counts[:2]), (1, counts[2:])):
            sent = sum(sum(c.values()) for c in mine_counts)
            limited = sum(c.get("429", 0) for c in mine_counts)
            assert sent > 2 * DEFAULT_REFUSAL_BURST and limited >= sent // 2, mine_counts
            assert not any(c.get("200") for c in mine_counts), mine_counts
            lines = [
                x
                for p in d.audit_files()
                for x in p.read_bytes().splitlines()
                if json.loads(x)["peer"]["uid"] == uid and json.loads(x)["time"] >= int(started)
            ]
            groups = len(json.loads(lines[0])["peer"]["groups"])
            records = DEFAULT_REFUSAL_BURST + 1 + (DEFAULT_REFUSAL_RATE + 1) * elapsed
            bound = records * (RECORD_BYTES + GROUP_BYTES * groups)
            grown = sum(len(x) + 1 for x in lines)
            assert len(lines) <= records and grown <= bound, (uid, len(lines), grown, bound)
            print(f"uid {uid}: {sent} requests in {elapsed:.1f}s, {limited} answered 429, "
                  f"{len(lines)} records, {grown} bytes (bound {bound:.0f})")  # fmt: skip
    finally:
        d.stop()


def test_429s_over_a_rule_rate_are_recorded_once_a_second(shared_tmp: Path) -> None:
    """A uid over its rule's rate gets 429s recorded at most once a second (2 workers); failures
    after a grant (401 from a rule without rate) are not refusals: 70 stay 401, none is 429."""
    from signerd import Client

    key = f"{unique('rl')}/k"
    policy: dict[str, Any] = policy_allow_all()
    policy["rules"] += [
        {"name": "signer", "uids": [65534], "tenants": [key.split("/")[0]],
         "operations": ["sign"], "rate": 5, "burst": 5},
        {"name": "checker", "uids": [65534], "tenants": ["*"], "operations": ["verify"]},
    ]  # fmt: skip
    base = shared_tmp
    d = start_daemon(
        base / "d",
        server={"socket_group": "staff", "socket_mode": "0660", "workers": 2},
        policy=policy,
    )
    try:
        with Client(d.socket_path) as admin:
            admin.create_key(key)
            kid = admin.sign(key, b"x").kid
        started = time.time()
        sign = json.dumps({"key": key, "data": "eA=="}).encode()
        answers = as_stranger(d, [http_post("/v1/sign", sign)] * 300)
        elapsed = time.time() - started
        statuses = [s for s, _, _ in answers]
        assert statuses.count(200) + statuses.count(429) == 300
        assert 5 <= statuses.count(200) <= 5 + 5 * elapsed, (statuses.count(200), elapsed)
        bad = json.dumps({"kid": kid, "data": "eA==", "signature": "A" * 88}).encode()
        verified = as_stranger(d, [http_post("/v1/verify", bad)] * 70)
        assert [s for s, _, _ in verified] == [401] * 70
        assert d.stop() == 0, d.log_text()[-2000:]
        ours = [r for r in d.audit_records() if r["peer"]["uid"] == 65534]
        limited = [r for r in ours if r["outcome"] == "rate_limited"]
        assert 1 <= len(limited) <= 1 + elapsed, (len(limited), elapsed)
        assert len([r for r in ours if r["outcome"] == "ok"]) == statuses.count(200)
        assert len([r for r in ours if r["outcome"] == "invalid_signature"]) == 70
    finally:
        d.stop()


def test_a_record_is_at_most_2_kib() -> None:
    """The longest record a caller can cause (every field at its longest, the longest reason) fits
    RECORD_BYTES plus GROUP_BYTES per supplementary group; a batch adds at most 400 B per signed item."""
    import inspect

    import signerd.errors as errors
    from signerd.audit import AuditEvent
    from signerd.audit._chain import encode_record as _encode
    from signerd.authz import Peer
    from signerd.server import AuditNotes
    from signerd.server._batchnotes import note_batch as _note_batch
    from signerd.wire import KeyName

    key = KeyName("t" * 63, "n" * 63)
    kid = key.kid(999_999_999)
    codes = sorted(  # the longest codes most often
        (
            c.code
            for c in vars(errors).values()
            if inspect.isclass(c) and issubclass(c, errors.SignerdError)
        ),
        key=len,
        reverse=True,
    )
    parsed = [(key, b"") for _ in range(256)]
    results = [{"error": {"code": codes[i % len(codes)]}} for i in range(256)]
    batch = _note_batch(AuditNotes(), parsed, results)
    assert batch is not None
    messages = [c.default_message for c in vars(errors).values() if hasattr(c, "default_message")]
    reasons = [
        f"every item was refused: {batch}",
        f"caller may not destroy key {key} (4294967295 not recorded)",
        *(f"{m} (4294967295 not recorded)" for m in messages),
    ]
    for groups in (0, 100):
        peer = Peer(2**22, 2**32 - 2, 2**32 - 2, "u" * 255, "x" * 32, (2**32 - 2,) * groups)
        for reason in reasons:
            event = AuditEvent(
                time=9e9, request_id="r" * 64, peer=peer, operation="schedule-deletion",
                outcome="attestation_mismatch", tenant=key.tenant, key=str(key), kid=kid,
                payload_sha256=("a" * 64,), reason=reason, status=429,
            )  # fmt: skip
            line = _encode(event, 2**63, "f" * 64, {}, f"{'0' * 16}-{2**63}", b"k")
            assert len(line) + 1 <= RECORD_BYTES + GROUP_BYTES * groups, (len(line), reason)
    # a signed item adds its keyed hash and at most one key, tenant and kid to the lists
    item = len(',"' + "a" * 64 + '"') + len(str(key)) + 1 + len(key.tenant) + 1 + len(kid) + 1
    assert item <= 400


def test_security_doc_states_the_audit_bound_of_the_defaults() -> None:
    """docs/security.md's audit-bytes figures are those of the default buckets and RECORD_BYTES."""
    from signerd.authz import (
        DEFAULT_REFUSAL_BURST,
        DEFAULT_REFUSAL_RATE,
        DEFAULT_UNMATCHED_BURST,
        DEFAULT_UNMATCHED_RATE,
    )

    readme = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    text = " ".join(readme.split())
    kib = RECORD_BYTES // 1024
    assert f"A record is at most {kib} KiB, plus {GROUP_BYTES} bytes per supplementary" in text
    matched = (DEFAULT_REFUSAL_RATE + 1) * kib
    burst = (DEFAULT_REFUSAL_BURST + 1) * kib
    stranger = (DEFAULT_UNMATCHED_RATE + 1) * kib
    row = (
        f"| refusals for callers some rule matches | {DEFAULT_REFUSAL_RATE:g}/s per uid, "
        f"burst {DEFAULT_REFUSAL_BURST} |"
    )
    assert row in readme
    assert f"| {matched:g} KiB/s after {burst} KiB ({stranger:g} KiB/s when no rule matches) |" in (
        readme
    )
    times = "\N{MULTIPLICATION SIGN}"
    assert f"({DEFAULT_REFUSAL_RATE:g} + 1) {times} {kib} KiB = {matched:g} KiB/s" in text
    assert f"a burst of {DEFAULT_REFUSAL_BURST + 1} records ({burst} KiB)" in text
    assert DEFAULT_UNMATCHED_BURST == DEFAULT_REFUSAL_BURST
