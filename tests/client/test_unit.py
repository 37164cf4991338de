"""The client library against a scripted aiohttp server on a Unix socket.

The server here is a small stand-in for signerd that answers from tables the
tests fill in, counts connections and requests, and can stall or drop a
connection on demand. It exists to pin the client's own behaviour (keep-alive,
reconnects, timeouts, error mapping, the JWKS cache); the client against the
real daemon is tests/client/test_client.py.
"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from signerd import errors
from signerd.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    KeyDescription,
    RequestTimeout,
    Signature,
    VersionState,
)
from signerd.wire import to_jwk

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def description(key: str, versions: int, active: int) -> dict[str, Any]:
    tenant, name = key.split("/")
    rows = [
        {
            "version": n,
            "kid": f"{tenant}.{name}.v{n}",
            "state": "active" if n == active else "verify-only",
            "created_at": 1795000000 + n,
        }
        for n in range(1, versions + 1)
    ]
    return {
        "key": key,
        "tenant": tenant,
        "name": name,
        "active_kid": f"{tenant}.{name}.v{active}",
        "versions": rows,
    }


def envelope(
    code: str, status: int, message: str = "scripted", request_id: str = "rid-1"
) -> web.Response:
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    return web.json_response(body, status=status, headers={"X-Request-Id": request_id})


class FakeSignerd:
    """A scripted signerd stand-in in its own thread and event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Handler] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.queries: list[dict[str, str]] = []
        self.drop_next = 0  # close the connection instead of answering, this many times
        self.idempotency: list[tuple[str, str | None]] = []  # (path, Idempotency-Key) per request
        self._transports: list[Any] = []
        self.signing_key = Ed25519PrivateKey.generate()
        self.sign_kid = "acme.feedback.v1"
        self.jwks: dict[str, list[dict[str, str]]] = {}
        self.kids: dict[str, dict[str, Any]] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner: web.AppRunner | None = None

    @property
    def connections(self) -> int:
        return len(self._transports)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.path).start()

    def stop(self) -> None:
        if self.runner is not None:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def close_connections(self) -> None:
        """Close every connection from the server side, as an idle timeout does."""

        def close_all() -> None:
            for t in self._transports:
                t.close()

        self.loop.call_soon_threadsafe(close_all)
        time.sleep(0.1)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if not any(t is request.transport for t in self._transports):
            self._transports.append(request.transport)
        self.calls[(request.method, request.path)] += 1
        self.idempotency.append((request.path, request.headers.get("Idempotency-Key")))
        self.queries.append(dict(request.query))
        if self.drop_next > 0:
            self.drop_next -= 1
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        handler = self.routes.get((request.method, request.path))
        if handler is not None:
            return await handler(request)
        return await self._default(request)

    async def _default(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path in ("/v1/health", "/v1/ready"):
            return web.json_response({"status": "ok" if path.endswith("health") else "ready"})
        if path == "/v1/sign":
            body = await request.json()
            data = base64.b64decode(body["data"])
            sig = base64.b64encode(self.signing_key.sign(data)).decode()
            return web.json_response({"kid": self.sign_kid, "signature": sig})
        if path == "/v1/jwks":
            return web.json_response({"keys": self.jwks.get(request.query.get("tenant", ""), [])})
        if path.startswith("/v1/kids/"):
            kid = path.rsplit("/", 1)[1]
            if kid in self.kids:
                return web.json_response(self.kids[kid])
            return envelope("unknown_kid", 401, "kid is not known")
        if path.endswith("/rotate"):
            return web.json_response(
                {"kid": "acme.feedback.v2", "key": description("acme/feedback", 2, 2)}
            )
        return envelope("not_found", 404, "no such endpoint")


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="sc", dir="/tmp"))  # short: AF_UNIX paths max 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def fake(sock_dir: Path) -> Iterator[FakeSignerd]:
    server = FakeSignerd(str(sock_dir / "s.sock"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(fake: FakeSignerd) -> Iterator[Client]:
    with Client(fake.path, timeout=5.0, jwks_refetch_interval=0.0) as c:
        yield c


# --- keep-alive and reconnects ---


def test_many_calls_share_one_connection(fake: FakeSignerd, client: Client) -> None:
    """Sequential calls reuse one keep-alive connection."""
    for _ in range(25):
        assert client.health() == "ok"
    assert fake.calls[("GET", "/v1/health")] == 25
    assert fake.connections == 1


def test_reconnects_after_the_server_closed_the_idle_connection(
    fake: FakeSignerd, client: Client
) -> None:
    """An idle connection the daemon closed is replaced transparently."""
    assert client.health() == "ok"
    fake.close_connections()
    assert client.rotate("acme/feedback")[0] == "acme.feedback.v2"
    assert fake.connections == 2
    assert fake.calls[("POST", "/v1/keys/acme/feedback/rotate")] == 1


def test_sign_is_sent_again_once_when_a_reused_connection_breaks(
    fake: FakeSignerd, client: Client
) -> None:
    """A sign whose reused connection drops without an answer is resent on a fresh one."""
    client.health()
    fake.drop_next = 1
    sig = client.sign("acme/feedback", b"payload")
    fake.signing_key.public_key().verify(sig.signature, b"payload")
    assert fake.calls[("POST", "/v1/sign")] == 2
    assert fake.connections == 2


def test_a_second_break_is_reported_not_retried_again(fake: FakeSignerd, client: Client) -> None:
    """The resend happens once: a second dropped connection raises ConnectionFailed."""
    client.health()
    fake.drop_next = 2
    with pytest.raises(ConnectionFailed):
        client.sign("acme/feedback", b"payload")
    assert fake.calls[("POST", "/v1/sign")] == 2


ROTATE = "/v1/keys/acme/feedback/rotate"


def _keys_sent(fake: FakeSignerd, path: str) -> list[str | None]:
    return [key for at, key in fake.idempotency if at == path]


def test_rotate_is_sent_again_only_with_its_idempotency_key(
    fake: FakeSignerd, client: Client
) -> None:
    """A rotate whose connection drops is sent again with the same Idempotency-Key; the
    next rotate has a key of its own; a sign carries none."""
    client.health()
    fake.drop_next = 1
    assert client.rotate("acme/feedback")[0] == "acme.feedback.v2"
    client.rotate("acme/feedback")
    client.sign("acme/feedback", b"payload")
    first, again, second = _keys_sent(fake, ROTATE)
    assert first is not None and re.fullmatch(r"[A-Za-z0-9_-]{32}", first)
    assert again == first and second not in (None, first)
    assert _keys_sent(fake, "/v1/sign") == [None]


def test_rotate_gives_up_after_three_sends(fake: FakeSignerd, client: Client) -> None:
    """A rotate whose connection drops three times raises OutcomeUnknown (caused by the
    ConnectionFailed, no request id) after exactly three sends, all with one key."""
    client.health()
    fake.drop_next = 3
    with pytest.raises(errors.OutcomeUnknown) as info:
        client.rotate("acme/feedback")
    assert info.value.request_id is None and isinstance(info.value.__cause__, ConnectionFailed)
    keys = _keys_sent(fake, ROTATE)
    assert len(keys) == 3 and len(set(keys)) == 1


def test_after_a_doubt_a_refusal_that_may_pass_is_tried_again(
    fake: FakeSignerd, client: Client
) -> None:
    """Once an attempt may have acted, a later retryable refusal (the admin lock busy) is tried
    again with the key; one still refused at the end leaves the outcome unknown, not refused."""
    answers = ["outcome_unknown", "backend_unavailable", "backend_unavailable"]

    async def handler(request: web.Request) -> web.StreamResponse:
        code = answers.pop(0)
        return envelope(code, errors.CODES[code].status)

    fake.routes[("POST", ROTATE)] = handler
    with pytest.raises(errors.OutcomeUnknown) as info:
        client.rotate("acme/feedback")
    assert isinstance(info.value.__cause__, errors.BackendUnavailable)
    assert len(_keys_sent(fake, ROTATE)) == 3 and not answers
    answers[:] = ["backend_unavailable"]  # no doubt before it: a plain refusal, sent once
    with pytest.raises(errors.BackendUnavailable) as plain:
        client.rotate("acme/feedback")
    assert type(plain.value) is errors.BackendUnavailable and len(_keys_sent(fake, ROTATE)) == 4


def test_outcome_unknown_is_asked_again_with_the_same_key(
    fake: FakeSignerd, client: Client
) -> None:
    """An outcome_unknown answer to an admin call is followed by the same request with the same
    key, whose answer is returned; other errors are raised at once."""
    answers = ["outcome_unknown", None]

    async def handler(request: web.Request) -> web.StreamResponse:
        code = answers.pop(0)
        if code is not None:
            return envelope(code, 500)
        return web.json_response(description("acme/feedback", 1, 1), status=201)

    fake.routes[("POST", "/v1/keys")] = handler
    assert client.create_key("acme/feedback").key == "acme/feedback"
    keys = _keys_sent(fake, "/v1/keys")
    assert len(keys) == 2 and keys[0] == keys[1] is not None
    answers[:] = ["idempotency_key_reused"]
    with pytest.raises(errors.IdempotencyKeyReused):
        client.create_key("acme/feedback")
    assert len(_keys_sent(fake, "/v1/keys")) == 3


def test_an_admin_call_to_no_daemon_is_not_repeated(tmp_path: Path) -> None:
    """Nothing listens: the admin call fails at once with ConnectionFailed, not after retries."""
    with Client(str(tmp_path / "none.sock"), timeout=2.0) as c:
        started = time.monotonic()
        with pytest.raises(ConnectionFailed) as info:
            c.rotate("acme/feedback")
        assert time.monotonic() - started < 0.15 and not info.value.sent


def test_threads_share_a_client_safely(fake: FakeSignerd, client: Client) -> None:
    """Concurrent threads on one client each get their own answer; connections are pooled."""

    def work(n: int) -> None:
        for i in range(20):
            data = f"thread {n} item {i}".encode()
            sig = client.sign("acme/feedback", data)
            fake.signing_key.public_key().verify(sig.signature, data)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert fake.calls[("POST", "/v1/sign")] == 160
    assert fake.connections <= 8


def test_missing_socket_raises_connection_failed(sock_dir: Path) -> None:
    """No daemon on the socket: ConnectionFailed, a retryable BackendUnavailable."""
    with (
        Client(sock_dir / "absent.sock", timeout=1.0) as c,
        pytest.raises(ConnectionFailed) as info,
    ):
        c.health()
    assert isinstance(info.value, errors.BackendUnavailable)
    assert info.value.retryable
    assert info.value.code == "backend_unavailable"


# --- timeouts ---


def _slow_then_fast(delay: float) -> Handler:
    state = {"first": True}

    async def handler(request: web.Request) -> web.StreamResponse:
        if state["first"]:
            state["first"] = False
            await asyncio.sleep(delay)
            return web.json_response({"status": "late"})
        return web.json_response({"status": "ok"})

    return handler


def test_per_call_timeout(fake: FakeSignerd, client: Client) -> None:
    """A call without an answer within its timeout raises RequestTimeout in time."""
    fake.routes[("GET", "/v1/health")] = _slow_then_fast(2.0)
    start = time.monotonic()
    with pytest.raises(RequestTimeout):
        client.health(timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_late_answer_never_reaches_the_next_call(fake: FakeSignerd, client: Client) -> None:
    """After a timeout the connection is dropped, so the next call reads its own answer."""
    fake.routes[("GET", "/v1/health")] = _slow_then_fast(0.6)
    with pytest.raises(RequestTimeout):
        client.health(timeout=0.2)
    time.sleep(0.6)
    assert client.health() == "ok"


def test_client_default_timeout_applies(fake: FakeSignerd) -> None:
    """The client's timeout bounds calls that give none."""
    fake.routes[("GET", "/v1/health")] = _slow_then_fast(2.0)
    with Client(fake.path, timeout=0.3) as c, pytest.raises(RequestTimeout):
        c.health()


# --- answers: errors and results ---


@pytest.mark.parametrize("code", sorted(errors.CODES))
def test_error_envelope_raises_the_class_of_its_code(
    fake: FakeSignerd, client: Client, code: str
) -> None:
    """Each wire code raises exactly its class, with the daemon's message and request id."""
    cls = errors.CODES[code]

    async def handler(request: web.Request) -> web.StreamResponse:
        return envelope(code, cls.status, f"message for {code}", "req-42")

    fake.routes[("GET", "/v1/keys/acme/feedback")] = handler
    with pytest.raises(errors.SignerdError) as info:
        client.get_key("acme/feedback")
    assert type(info.value) is cls
    assert info.value.message == f"message for {code}"
    assert info.value.request_id == "req-42"


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, b"not json", "text/plain"),
        (502, b"<html>bad gateway</html>", "text/html"),
        (200, b'{"key": "acme/feedback"}', "application/json"),
        (404, b'{"error": "flat"}', "application/json"),
    ],
)
def test_answers_outside_the_protocol_raise_internal_error(
    fake: FakeSignerd, client: Client, status: int, body: bytes, content_type: str
) -> None:
    """An answer that is not the protocol's raises InternalError, never a raw exception."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=body, content_type=content_type)

    fake.routes[("GET", "/v1/keys/acme/feedback")] = handler
    with pytest.raises(errors.InternalError):
        client.get_key("acme/feedback")


def test_key_description_is_typed(fake: FakeSignerd, client: Client) -> None:
    """A key description becomes a frozen KeyDescription with typed versions."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response(description("acme/feedback", 2, 2))

    fake.routes[("GET", "/v1/keys/acme/feedback")] = handler
    desc = client.get_key("acme/feedback")
    assert isinstance(desc, KeyDescription)
    assert desc.active_kid == "acme.feedback.v2"
    assert [v.state for v in desc.versions] == [VersionState.VERIFY_ONLY, VersionState.ACTIVE]
    with pytest.raises(AttributeError):
        desc.key = "other/key"  # type: ignore[misc]


def test_bad_key_name_is_refused_before_sending(fake: FakeSignerd, client: Client) -> None:
    """A key name that would change the URL path raises InvalidKeyName and sends nothing."""
    with pytest.raises(errors.InvalidKeyName):
        client.get_key("acme/../../v1/sign")
    with pytest.raises(errors.InvalidKeyName):
        client.list_keys(tenant="a&b=c")
    assert sum(fake.calls.values()) == 0


def test_sign_batch_errors_come_back_in_place(fake: FakeSignerd, client: Client) -> None:
    """A batch answers item by item: a failed item is its typed error, with the request id."""
    good = base64.b64encode(b"\x01" * 64).decode()

    async def handler(request: web.Request) -> web.StreamResponse:
        results = [
            {"kid": "acme.feedback.v1", "signature": good},
            {"error": {"code": "unknown_key", "message": "key does not exist"}},
        ]
        return web.json_response({"results": results}, headers={"X-Request-Id": "batch-7"})

    fake.routes[("POST", "/v1/sign")] = handler
    first, second = client.sign_batch([("acme/feedback", b"a"), ("acme/none", b"b")])
    assert first == Signature("acme.feedback.v1", b"\x01" * 64)
    assert isinstance(second, errors.UnknownKey)
    assert second.request_id == "batch-7"
    assert client.sign_batch([]) == []
    assert fake.calls[("POST", "/v1/sign")] == 1


# --- verify_local and its JWKS cache ---


class Keyring:
    """Real Ed25519 keys published through the fake's JWKS and kid tables."""

    def __init__(self, fake: FakeSignerd) -> None:
        self.fake = fake
        self.keys: dict[str, Ed25519PrivateKey] = {}

    def add(self, kid: str, state: str = "active", published: bool = True) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        self.keys[kid] = key
        tenant, name, version = kid.split(".")
        jwk = to_jwk(kid, raw_public(key))
        if published:
            self.fake.jwks.setdefault(tenant, []).append(jwk)
        self.fake.kids[kid] = {
            "kid": kid,
            "key": f"{tenant}/{name}",
            "version": int(version[1:]),
            "state": state,
            "jwk": jwk,
            "pem": "-----BEGIN PUBLIC KEY-----\n",
        }
        return key

    def unpublish(self, kid: str, state: str) -> None:
        tenant = kid.split(".")[0]
        self.fake.jwks[tenant] = [j for j in self.fake.jwks[tenant] if j["kid"] != kid]
        self.fake.kids[kid]["state"] = state


JWKS = ("GET", "/v1/jwks")


def test_verify_local_fetches_the_jwks_once(fake: FakeSignerd, client: Client) -> None:
    """Repeated local verifies use the cached JWKS of the kid's tenant."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1")
    for i in range(5):
        data = f"msg {i}".encode()
        client.verify_local("acme.feedback.v1", data, key.sign(data))
    assert fake.calls[JWKS] == 1
    assert fake.queries[0] == {"tenant": "acme"}


def test_verify_local_refetches_on_an_unknown_kid(fake: FakeSignerd, client: Client) -> None:
    """A kid published after the fetch is found by fetching the JWKS again, once."""
    ring = Keyring(fake)
    ring.add("acme.feedback.v1")
    client.verify_local("acme.feedback.v1", b"x", ring.keys["acme.feedback.v1"].sign(b"x"))
    new = ring.add("acme.feedback.v2")
    client.verify_local("acme.feedback.v2", b"y", new.sign(b"y"))
    assert fake.calls[JWKS] == 2
    assert fake.calls[("GET", "/v1/kids/acme.feedback.v2")] == 0


def test_verify_local_unknown_kid_after_refetch(fake: FakeSignerd, client: Client) -> None:
    """A kid in neither the refetched JWKS nor signerd raises UnknownKid."""
    ring = Keyring(fake)
    ring.add("acme.feedback.v1")
    stranger = Ed25519PrivateKey.generate()
    client.verify_local("acme.feedback.v1", b"x", ring.keys["acme.feedback.v1"].sign(b"x"))
    with pytest.raises(errors.UnknownKid):
        client.verify_local("acme.feedback.v9", b"x", stranger.sign(b"x"))
    assert fake.calls[JWKS] == 2
    assert fake.calls[("GET", "/v1/kids/acme.feedback.v9")] == 1


@pytest.mark.parametrize(
    ("state", "error"), [("retired", errors.RetiredKid), ("destroyed", errors.DestroyedKid)]
)
def test_verify_local_refuses_retired_and_destroyed_kids(
    fake: FakeSignerd, client: Client, state: str, error: type[errors.SignerdError]
) -> None:
    """A kid missing from the JWKS raises the error of its state, whatever the signature."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1", state=state, published=False)
    with pytest.raises(error):
        client.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))


def test_verify_local_stops_trusting_a_kid_retired_after_the_ttl(fake: FakeSignerd) -> None:
    """A cached kid retired on the daemon stops verifying locally after jwks_ttl."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1")
    with Client(fake.path, jwks_ttl=0.2) as c:
        c.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))
        ring.unpublish("acme.feedback.v1", "retired")
        c.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))  # still inside the ttl
        time.sleep(0.3)
        with pytest.raises(errors.RetiredKid):
            c.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))


def test_verify_local_rejects_a_bad_signature_without_fetching(
    fake: FakeSignerd, client: Client
) -> None:
    """A wrong signature under a cached kid raises InvalidSignature locally."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1")
    client.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))
    with pytest.raises(errors.InvalidSignature):
        client.verify_local("acme.feedback.v1", b"y", key.sign(b"x"))
    with pytest.raises(errors.InvalidSignature):
        client.verify_local("acme.feedback.v1", b"x", b"short")
    assert fake.calls[JWKS] == 1


def test_verify_local_malformed_kid_sends_nothing(fake: FakeSignerd, client: Client) -> None:
    """A kid outside the grammar raises UnknownKid without a request."""
    with pytest.raises(errors.UnknownKid):
        client.verify_local("../etc/passwd", b"x", b"\x00" * 64)
    assert sum(fake.calls.values()) == 0


def test_verify_local_refetch_is_rate_limited(fake: FakeSignerd) -> None:
    """Made-up kids inside jwks_refetch_interval cost one kid lookup each, not a JWKS each."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1")
    with Client(fake.path, jwks_refetch_interval=60.0) as c:
        c.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))
        for n in range(2, 6):
            with pytest.raises(errors.UnknownKid):
                c.verify_local(f"acme.feedback.v{n}", b"x", key.sign(b"x"))
        fresh = ring.add("acme.feedback.v7")  # published now: found through its kid lookup
        c.verify_local("acme.feedback.v7", b"z", fresh.sign(b"z"))
    assert fake.calls[JWKS] == 1


# --- one source for both clients ---


def test_sync_client_is_generated_from_the_async_one() -> None:
    """_sync.py is exactly what _unasync makes of _async.py: the two clients cannot drift."""
    from signerd.client import _unasync

    source = _unasync.SOURCE.read_text(encoding="utf-8")
    assert _unasync.TARGET.read_text(encoding="utf-8") == _unasync.generate(source)
    assert _unasync.main(["--check"]) == 0


def test_unasync_turns_coroutines_into_plain_methods() -> None:
    """The generator removes async/await and swaps the async names, and refuses a source whose
    per-file text it cannot find."""
    from signerd.client import _unasync

    source = _unasync.SOURCE.read_text(encoding="utf-8")
    out = _unasync.generate(source)
    assert "async " not in out and "await " not in out and "AsyncTransport" not in out
    assert "class Client:" in out and "def __enter__(self) -> Client:" in out
    with pytest.raises(ValueError, match="block not found"):
        _unasync.generate(source.replace('class AsyncClient:\n    """The same', "class X:"))


# --- the async client: same behaviour on aiohttp ---


async def test_async_calls_share_one_connection(fake: FakeSignerd) -> None:
    """The async client reuses one keep-alive connection for sequential calls."""
    async with AsyncClient(fake.path, timeout=5.0) as c:
        for _ in range(10):
            assert await c.health() == "ok"
    assert fake.connections == 1


async def test_async_sign_is_resent_once_after_a_drop(fake: FakeSignerd) -> None:
    """The async client resends a sign once when its connection drops (no Idempotency-Key),
    and a rotate with its Idempotency-Key, at most three times in all."""
    async with AsyncClient(fake.path, timeout=5.0) as c:
        await c.health()
        fake.drop_next = 1
        sig = await c.sign("acme/feedback", b"payload")
        fake.signing_key.public_key().verify(sig.signature, b"payload")
        assert fake.calls[("POST", "/v1/sign")] == 2
        assert _keys_sent(fake, "/v1/sign") == [None, None]
        fake.drop_next = 1
        assert (await c.rotate("acme/feedback"))[0] == "acme.feedback.v2"
        keys = _keys_sent(fake, ROTATE)
        assert len(keys) == 2 and keys[0] == keys[1] is not None
        fake.drop_next = 3
        with pytest.raises(errors.OutcomeUnknown):
            await c.rotate("acme/feedback")
        keys = _keys_sent(fake, ROTATE)[2:]
        assert (
            len(keys) == 3 and len(set(keys)) == 1 and keys[0] not in _keys_sent(fake, ROTATE)[:2]
        )


@pytest.mark.parametrize("code", sorted(errors.CODES))
async def test_async_error_envelope_raises_the_class_of_its_code(
    fake: FakeSignerd, code: str
) -> None:
    """The async client maps each wire code to exactly its class."""
    cls = errors.CODES[code]

    async def handler(request: web.Request) -> web.StreamResponse:
        return envelope(code, cls.status, "m", "req-9")

    fake.routes[("POST", "/v1/verify")] = handler
    async with AsyncClient(fake.path) as c:
        with pytest.raises(errors.SignerdError) as info:
            await c.verify("acme.feedback.v1", b"x", b"y")
    assert type(info.value) is cls
    assert info.value.request_id == "req-9"


async def test_async_timeout_and_missing_socket(fake: FakeSignerd, sock_dir: Path) -> None:
    """The async client raises RequestTimeout in time, and ConnectionFailed with no daemon."""
    fake.routes[("GET", "/v1/health")] = _slow_then_fast(2.0)
    async with AsyncClient(fake.path) as c:
        start = time.monotonic()
        with pytest.raises(RequestTimeout):
            await c.health(timeout=0.3)
        assert time.monotonic() - start < 1.5
    async with AsyncClient(sock_dir / "absent.sock") as c:
        with pytest.raises(ConnectionFailed):
            await c.health()


async def test_async_verify_local_refetches_on_an_unknown_kid(fake: FakeSignerd) -> None:
    """Async local verify: one fetch, one refetch for a new kid, then a lookup of its state."""
    ring = Keyring(fake)
    key = ring.add("acme.feedback.v1")
    async with AsyncClient(fake.path, jwks_refetch_interval=0.0) as c:
        await c.verify_local("acme.feedback.v1", b"x", key.sign(b"x"))
        await c.verify_local("acme.feedback.v1", b"y", key.sign(b"y"))
        new = ring.add("acme.feedback.v2")
        await c.verify_local("acme.feedback.v2", b"z", new.sign(b"z"))
        assert fake.calls[JWKS] == 2
        ring.add("acme.feedback.v3", state="retired", published=False)
        with pytest.raises(errors.RetiredKid):
            await c.verify_local("acme.feedback.v3", b"z", new.sign(b"z"))
        assert fake.calls[JWKS] == 3
