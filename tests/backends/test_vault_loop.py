"""Transit signs sent from the event loop (``LoopSigner``) against a real ``bao server -dev``:
kept-alive connections of the loop's own, and every case it does not take left to the
blocking path (``SignClient``), which retries, fails over and translates."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from signerd.backends.vault import SignClient, from_config
from signerd.backends.vault._loopsign import LoopSigner
from signerd.errors import BackendUnavailable, UnknownKey
from signerd.wire import KeyName

from ..conftest import unique
from ..support.openbao import BaoServer, FaultProxy, dev_server, vault_backend_config
from .test_vault_sign import connections, verifies


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("vl"), "loop")


async def _one(backend: Any, key: KeyName, data: bytes) -> bytes:
    """One signature of ``data`` with version 1, sent from the loop."""
    signed = await backend.sign_on_loop(key, 1, [data])
    assert signed is not None and isinstance(signed[0], bytes), signed
    return bytes(signed[0])


async def test_signs_from_the_loop_keep_their_connections(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """20 signs one after another take one connection; 3 at once, 3 in all, kept alive."""
    public = make().create(key).versions[0].public_key
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        await asyncio.to_thread(backend.describe, key)  # the login, through hvac
        before = connections(proxy)
        for i in range(20):
            sig = await _one(backend, key, b"%d" % i)
            assert verifies(public, sig, b"%d" % i)
        assert connections(proxy) - before == 1
        for _ in range(5):
            answers = await asyncio.gather(
                *(backend.sign_on_loop(key, 1, [b"g%d" % i]) for i in range(3))
            )
            assert all(a is not None and verifies(public, a[0], b"g%d" % i)
                       for i, a in enumerate(answers))  # fmt: skip
        assert connections(proxy) - before == 3
        assert backend.loop_signer.sent == 35 and backend.loop_signer.declined == 0


async def test_a_batch_from_the_loop_verifies_item_by_item(make: Any, key: KeyName) -> None:
    backend = make()
    public = (await asyncio.to_thread(backend.create, key)).versions[0].public_key
    items = [b"item-%d" % i for i in range(50)]
    signed = await backend.sign_on_loop(key, 1, items)
    assert signed is not None and len(signed) == 50
    assert all(verifies(public, s, d) for s, d in zip(signed, items, strict=True))


async def test_a_lost_answer_is_left_to_the_blocking_path(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """An answer lost with its connection: None (sign the blocking way); the next sign
    from the loop opens a fresh connection."""
    public = make().create(key).versions[0].public_key
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        await asyncio.to_thread(backend.describe, key)
        assert await backend.sign_on_loop(key, 1, [b"warm"]) is not None
        proxy.drop_answer(b"/sign/")
        assert await backend.sign_on_loop(key, 1, [b"lost"]) is None
        (sig,) = await asyncio.to_thread(backend.sign, key, 1, [b"lost"])
        assert verifies(public, sig, b"lost") and proxy.dropped
        again = await _one(backend, key, b"next")
        assert verifies(public, again, b"next")
    assert backend.loop_signer.declined == 1


async def test_refusals_are_left_to_the_blocking_path(make: Any, key: KeyName) -> None:
    """Vault's refusal (no such key) is not read here: the blocking path gives its typed
    error, as it always did."""
    backend = make()
    await asyncio.to_thread(backend.check)
    assert await backend.sign_on_loop(key, 1, [b"x"]) is None
    with pytest.raises(UnknownKey):
        await asyncio.to_thread(backend.sign, key, 1, [b"x"])


async def test_a_node_that_does_not_answer_is_unavailable_in_time(make: Any) -> None:
    """A node that accepts and never answers: BackendUnavailable after ``timeout``, and
    its health is due for a check before the next sign (a cluster fails over then)."""
    backend = make()
    await asyncio.to_thread(backend.check)  # a token
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    addr = f"http://127.0.0.1:{listener.getsockname()[1]}"
    settings = replace(backend.settings, addr=addr, timeout=0.5)
    client = SignClient(settings, backend.transport.auth, lambda p, b: {})
    signer = LoopSigner(client, 2)
    try:
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="in time"):
            await signer.post("transit/sign/any", {"input": "eA=="})
        assert 0.4 < time.monotonic() - started < 3.0
    finally:
        signer.close()
        client.close()
        stop.set()
        thread.join(timeout=5)
        listener.close()
        for conn in held:
            conn.close()


async def test_nothing_to_connect_to_is_left_to_the_blocking_path(make: Any) -> None:
    backend = make()
    await asyncio.to_thread(backend.check)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    addr = f"http://127.0.0.1:{port}"
    settings = replace(backend.settings, addr=addr)
    signer = LoopSigner(SignClient(settings, backend.transport.auth, lambda p, b: {}), 2)
    assert await signer.post("transit/sign/any", {"input": "eA=="}) is None
    assert signer.declined == 1


async def test_every_connection_in_use_leaves_the_rest_to_the_blocking_path(
    make: Any, key: KeyName
) -> None:
    """At most ``limit`` exchanges at once from one loop: the others go the blocking way."""
    backend = make()
    await asyncio.to_thread(backend.create, key)
    signer = LoopSigner(backend.signer, 2)
    path = f"transit/sign/{backend.settings.key_prefix}{key.tenant}.{key.name}"
    answers = await asyncio.gather(
        *(signer.post(path, {"key_version": 1, "input": "eA=="}) for _ in range(5))
    )
    assert sum(a is not None for a in answers) == 2 and signer.declined == 3
    signer.close()


async def test_over_tls_with_the_configured_ca(tmp_path: Path, key: KeyName) -> None:
    """Over HTTPS the loop's connections trust ca_file; without it none is made, and the
    blocking path says why (BackendUnavailable: TLS)."""
    with dev_server(tmp_path / "tls", tls=True) as server:
        backend = from_config(vault_backend_config(server))
        untrusting = SignClient(
            replace(backend.settings, ca_file=None), backend.transport.auth, lambda p, b: {}
        )
        try:
            public = (await asyncio.to_thread(backend.create, key)).versions[0].public_key
            sig = await _one(backend, key, b"t")
            assert verifies(public, sig, b"t")
            path = f"transit/sign/{backend.settings.key_prefix}{key.tenant}.{key.name}"
            signer = LoopSigner(untrusting, 1)
            assert await signer.post(path, {"key_version": 1, "input": "dA=="}) is None
        finally:
            untrusting.close()
            backend.close()


async def test_the_key_service_signs_from_the_loop_and_falls_back(
    bao: BaoServer, key: KeyName
) -> None:
    """Through ``KeyService``: signs are sent from the loop; one whose answer is lost is
    signed the blocking way, and its caller sees a good signature either way."""
    from signerd.keys import KeyService, Settings

    with FaultProxy(bao.addr) as proxy:
        backend = from_config(vault_backend_config(bao, addr=proxy.addr))
        svc = KeyService(
            {"vault": backend},
            default_backend="vault",
            settings=Settings(refresh_interval=0),
        )
        await svc.start()
        try:
            public = (await svc.create(key)).versions[0].public_key
            for i in range(5):
                _, sig = await svc.sign(key, b"s%d" % i)
                assert verifies(public, sig, b"s%d" % i)
            assert backend.loop_signer.sent == 5
            proxy.drop_answer(b"/sign/")
            _, sig = await svc.sign(key, b"lost")
            assert verifies(public, sig, b"lost") and proxy.dropped
            assert backend.loop_signer.declined == 1
            signs = [line for line in proxy.forwarded if b"/sign/" in line]
            assert len(signs) == 7  # 5, the lost one, and it again the blocking way
        finally:
            await svc.close()
