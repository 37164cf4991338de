"""The client library against a real signerd on a real SoftHSM token."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from signerd import errors
from signerd.client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    KeyDescription,
    Signature,
    VerifyResult,
    VersionState,
)
from signerd.client._transport import UnixHTTPConnection
from signerd.wire import from_jwk

from ..conftest import DaemonProcess, start_daemon, unique, wait_until


@pytest.fixture
def client(daemon: DaemonProcess) -> Iterator[Client]:
    with Client(daemon.socket_path, timeout=30.0, jwks_refetch_interval=0.0) as c:
        yield c


@pytest.fixture
def key(client: Client) -> str:
    name = f"{unique('cl')}/feedback"
    client.create_key(name)
    return name


def kid_of(key: str, version: int) -> str:
    tenant, name = key.split("/")
    return f"{tenant}.{name}.v{version}"


def states(desc: KeyDescription) -> dict[int, VersionState]:
    return {v.version: v.state for v in desc.versions}


def test_create_describes_the_new_key(client: Client) -> None:
    """create_key returns a typed description with version 1 active."""
    name = f"{unique('cl')}/orders"
    desc = client.create_key(name)
    assert desc.key == name and desc.tenant == name.split("/")[0] and desc.name == "orders"
    assert desc.active_kid == kid_of(name, 1)
    assert states(desc) == {1: VersionState.ACTIVE}
    assert client.get_key(name) == desc
    assert name in [d.key for d in client.list_keys(tenant=desc.tenant)]


def test_lifecycle_sign_rotate_retire_destroy(client: Client, key: str) -> None:
    """Old signatures verify after rotate; then retire gives RetiredKid, destroy DestroyedKid."""
    old = client.sign(key, b"hello")
    assert old.kid == kid_of(key, 1) and len(old.signature) == 64
    new_kid, desc = client.rotate(key)
    assert new_kid == kid_of(key, 2) == desc.active_kid
    new = client.sign(key, b"hello")
    assert new.kid == new_kid
    assert client.verify(old.kid, b"hello", old.signature) == VerifyResult(
        old.kid, key, VersionState.VERIFY_ONLY
    )
    assert client.verify(new.kid, b"hello", new.signature).state is VersionState.ACTIVE
    desc = client.retire(key, 1)
    assert states(desc)[1] is VersionState.RETIRED
    with pytest.raises(errors.RetiredKid):
        client.verify(old.kid, b"hello", old.signature)
    with pytest.raises(errors.ConfirmationRequired):
        client.destroy(key, 1, confirm=new_kid, now=True)
    desc = client.destroy(key, 1, confirm=old.kid, now=True)
    assert states(desc)[1] is VersionState.DESTROYED
    with pytest.raises(errors.DestroyedKid):
        client.verify(old.kid, b"hello", old.signature)
    info = client.kid_info(old.kid)
    assert info.state is VersionState.DESTROYED and info.version == 1
    assert from_jwk(info.jwk)[0] == old.kid
    assert info.pem.startswith("-----BEGIN PUBLIC KEY-----")


def test_staged_rotation(client: Client, key: str) -> None:
    """A pending version is published but does not sign until promoted."""
    tenant = key.split("/")[0]
    pending_kid, desc = client.rotate(key, pending=True)
    assert states(desc) == {1: VersionState.ACTIVE, 2: VersionState.PENDING}
    assert pending_kid in [j["kid"] for j in client.jwks(tenant)]
    assert client.sign(key, b"x").kid == kid_of(key, 1)
    desc = client.promote(key, 2)
    assert states(desc) == {1: VersionState.VERIFY_ONLY, 2: VersionState.ACTIVE}
    assert client.sign(key, b"x").kid == pending_kid


def test_verify_never_returns_false(client: Client, key: str) -> None:
    """A wrong signature, wrong data or unknown kid raises; nothing returns a falsy result."""
    sig = client.sign(key, b"payload")
    with pytest.raises(errors.InvalidSignature):
        client.verify(sig.kid, b"other", sig.signature)
    with pytest.raises(errors.InvalidSignature):
        client.verify(sig.kid, b"payload", bytes(64))
    with pytest.raises(errors.UnknownKid):
        client.verify(kid_of(key, 9), b"payload", sig.signature)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c, k: c.create_key(k), errors.KeyExists),
        (lambda c, k: c.get_key(k + "x"), errors.UnknownKey),
        (lambda c, k: c.retire(k, 1), errors.InvalidState),
        (lambda c, k: c.promote(k, 7), errors.UnknownVersion),
        (lambda c, k: c.sign("No/Such", b"x"), errors.InvalidKeyName),
        (lambda c, k: c.create_key("bad name"), errors.InvalidKeyName),
        (lambda c, k: c.kid_info("acme.nothing.v1"), errors.UnknownKid),
    ],
    ids=[
        "exists",
        "unknown-key",
        "retire-active",
        "unknown-version",
        "sign-bad-name",
        "bad-name",
        "kid",
    ],
)
def test_daemon_errors_are_typed(
    client: Client,
    key: str,
    call: Callable[[Client, str], object],
    error: type[errors.SignerdError],
) -> None:
    """Each refusal of the daemon arrives as its signerd.errors class."""
    with pytest.raises(error):
        call(client, key)


def test_daemon_error_carries_the_request_id(client: Client) -> None:
    """An error from the daemon carries the request id the daemon logged it under."""
    with pytest.raises(errors.UnknownKey) as info:
        client.get_key(f"{unique('cl')}/absent")
    assert info.value.request_id


def test_sign_batch_answers_item_by_item(client: Client, key: str) -> None:
    """A batch returns a Signature per good item and a typed error per bad one, in order."""
    missing = f"{key.split('/')[0]}/absent"
    results = client.sign_batch([(key, b"a"), (missing, b"b"), (key, b"c")])
    assert [type(r) for r in results] == [Signature, errors.UnknownKey, Signature]
    for result, data in ((results[0], b"a"), (results[2], b"c")):
        assert isinstance(result, Signature)
        client.verify(result.kid, data, result.signature)


def test_verify_local_follows_rotation_and_retirement(daemon: DaemonProcess, key: str) -> None:
    """Local verification finds a new kid after rotation and refuses a retired one."""
    with Client(daemon.socket_path, jwks_refetch_interval=0.0) as c:
        s1 = c.sign(key, b"doc")
        c.verify_local(s1.kid, b"doc", s1.signature)
        c.rotate(key)
        s2 = c.sign(key, b"doc")
        c.verify_local(s2.kid, b"doc", s2.signature)
        c.verify_local(s1.kid, b"doc", s1.signature)
        with pytest.raises(errors.InvalidSignature):
            c.verify_local(s2.kid, b"tampered", s2.signature)
        with pytest.raises(errors.UnknownKid):
            c.verify_local(kid_of(key, 5), b"doc", s2.signature)
        c.retire(key, 1)
    with Client(daemon.socket_path) as fresh:
        with pytest.raises(errors.RetiredKid):
            fresh.verify_local(s1.kid, b"doc", s1.signature)
        fresh.verify_local(s2.kid, b"doc", s2.signature)


def test_one_connection_for_many_calls(daemon: DaemonProcess, key: str) -> None:
    """Sequential calls to the daemon reuse one keep-alive connection."""
    with Client(daemon.socket_path) as c:
        for i in range(30):
            c.sign(key, b"n%d" % i)
        assert c._transport.connections_opened == 1


def test_threads_share_one_client(client: Client, key: str) -> None:
    """Eight threads signing through one client all get valid signatures for their own data."""

    def work(n: int) -> int:
        for i in range(10):
            data = f"{n}:{i}".encode()
            sig = client.sign(key, data)
            client.verify(sig.kid, data, sig.signature)
        return n

    with ThreadPoolExecutor(8) as pool:
        assert sorted(pool.map(work, range(8))) == list(range(8))


def test_health_ready_and_jwks(client: Client, key: str) -> None:
    """health and ready answer; the tenant's JWKS holds RFC 8037 keys of that tenant only."""
    assert client.health() == "ok"
    assert client.ready() == "ready"
    tenant = key.split("/")[0]
    jwks = client.jwks(tenant)
    assert [j["kid"] for j in jwks] == [kid_of(key, 1)]
    (jwk,) = jwks
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", "Ed25519", "sig")


def test_client_survives_a_daemon_restart(tmp_path: Path) -> None:
    """A client whose daemon restarted reconnects on the next call."""
    base = Path(tmp_path) / "d"
    first = start_daemon(base)
    try:
        with Client(first.socket_path, timeout=30.0) as c:
            name = f"{unique('cl')}/restart"
            c.create_key(name)
            assert first.stop() == 0
            with pytest.raises(ConnectionFailed):
                c.sign(name, b"x")
            second = start_daemon(base)
            try:
                assert c.sign(name, b"x").kid == kid_of(name, 1)
            finally:
                second.stop()
    finally:
        first.stop()


async def test_async_client_lifecycle(daemon: DaemonProcess) -> None:
    """The async client creates, signs, rotates, verifies and reports errors like the sync one."""
    name = f"{unique('ac')}/feedback"
    async with AsyncClient(daemon.socket_path, timeout=30.0) as c:
        desc = await c.create_key(name)
        assert desc.active_kid == kid_of(name, 1)
        sigs = await asyncio.gather(*(c.sign(name, b"m%d" % i) for i in range(16)))
        assert {s.kid for s in sigs} == {kid_of(name, 1)}
        new_kid, _ = await c.rotate(name)
        result = await c.verify(sigs[0].kid, b"m0", sigs[0].signature)
        assert result.state is VersionState.VERIFY_ONLY
        await c.verify_local(new_kid, b"z", (await c.sign(name, b"z")).signature)
        batch = await c.sign_batch([(name, b"a"), (name + "x", b"b")])
        assert isinstance(batch[0], Signature) and isinstance(batch[1], errors.UnknownKey)
        with pytest.raises(errors.InvalidSignature):
            await c.verify(new_kid, b"m0", sigs[0].signature)
        with pytest.raises(errors.KeyExists):
            await c.create_key(name)
        assert await c.ready() == "ready"
        assert [d.key for d in await c.list_keys(name.split("/")[0])] == [name]


def test_over_the_connection_cap_is_said_not_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its uid's connection cap a caller gets TooManyConnections ("over the connection cap"), sync and async, even when its request found the connection closed."""
    d = start_daemon(tmp_path / "d", server={"max_connections_per_uid": 2, "workers": 1})
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s in held:
            s.connect(str(d.socket_path))
        wait_until(lambda: _refused_at_once(d.socket_path), 5, "the cap to be reached")

        def over_cap(exc: BaseException) -> bool:
            return (
                type(exc) is errors.TooManyConnections
                and "over the connection cap" in str(exc)
                and exc.retryable
                and exc.status == 503
            )

        for _ in range(5):
            with pytest.raises(errors.TooManyConnections) as caught, Client(d.socket_path) as c:
                c.health()
            assert over_cap(caught.value), caught.value

        async def async_call() -> None:
            async with AsyncClient(d.socket_path, timeout=5) as c:
                await c.health()

        with pytest.raises(errors.TooManyConnections) as caught:
            asyncio.run(async_call())
        assert over_cap(caught.value), caught.value

        # the refusal arrives before the request is sent: sending it fails (EPIPE), and the
        # answer waiting on the socket is read rather than reported as "cannot reach"
        connect = UnixHTTPConnection.connect

        def connect_then_wait_for_the_close(self: UnixHTTPConnection) -> None:
            connect(self)
            assert self.sock is not None
            poller = select.poll()
            poller.register(self.sock, select.POLLRDHUP)
            assert poller.poll(5000), "the daemon did not close the connection"

        monkeypatch.setattr(UnixHTTPConnection, "connect", connect_then_wait_for_the_close)
        with pytest.raises(errors.TooManyConnections) as caught, Client(d.socket_path) as c:
            c.sign(f"{unique('cap')}/k", b"x" * 300000)  # a request too large for one write
        assert over_cap(caught.value), caught.value
        monkeypatch.undo()

        for s in held:
            s.close()
        wait_until(lambda: not _refused_at_once(d.socket_path), 5, "a connection to be free")
        with Client(d.socket_path, timeout=5) as c:
            assert c.health() == "ok"
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0, d.log_text()[-2000:]


def _refused_at_once(path: Path) -> bool:
    """Whether a new connection gets the 503 too_many_connections answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(str(path))
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(4096)
        except OSError:
            return False
    if answer.startswith(b"HTTP/1.1 503"):
        assert b"Retry-After: 1\r\n" in answer and b'"code":"too_many_connections"' in answer
        return True
    return False
