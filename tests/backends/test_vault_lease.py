"""Changes of one transit key through several backends (as several daemons would make
them) against a real ``bao server -dev``: the lease in the key's metadata record."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hvac.exceptions
import pytest

from signerd.backends import VersionState
from signerd.backends.vault import VaultBackend, translate
from signerd.errors import BackendError, BackendUnavailable, InvalidState
from signerd.testing import wait_until
from signerd.wire import KeyName

from ..conftest import unique
from ..support.openbao import BaoServer, FaultProxy, vault_backend_config

THREADS = 4  # per backend
ROTATES = 3  # per thread
A, R = VersionState.ACTIVE, VersionState.RETIRED
RUN_LIMIT = 120.0  # seconds the concurrent rotations may take on a loaded machine


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("vl"), "k")


def record(bao: BaoServer, key: KeyName) -> dict[str, Any]:
    answer = bao.api("GET", f"secret/data/transit/signerd-{key.tenant}.{key.name}")
    data: dict[str, Any] = answer["data"]["data"]
    return data


def test_concurrent_rotations_through_two_backends_name_distinct_contiguous_versions(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """Threads on two backends rotating one key at once name distinct, contiguous versions."""
    a, b = make(), make()
    a.create(key)
    made: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(2 * THREADS)

    def rotate(backend: VaultBackend) -> None:
        try:
            start.wait(timeout=30)
            for _ in range(ROTATES):
                info = backend.rotate(key, pending=False)
                assert info.made is not None
                with lock:
                    made.append(info.made)
        except BaseException as exc:  # reported below
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=rotate, args=(x,)) for x in (a, b) * THREADS]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT)
    assert not any(t.is_alive() for t in threads), "rotations did not finish"
    assert not errors, errors
    total = 2 * THREADS * ROTATES
    assert sorted(made) == list(range(2, total + 2))
    info = b.describe(key)
    assert info.latest == total + 1
    assert [v.state for v in info.versions].count(VersionState.ACTIVE) == 1
    assert "lease" not in record(bao, key)
    assert time.monotonic() - began < RUN_LIMIT


def test_mixed_changes_through_two_backends_keep_one_active_version(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """Pending rotates, promotes and retires through two backends at once keep one active."""
    a, b = make(), make()
    a.create(key)
    errors: list[BaseException] = []

    def churn(backend: VaultBackend) -> None:
        try:
            for _ in range(4):
                new = backend.rotate(key, pending=True).made
                assert new is not None
                for version, state in ((new, A), (new - 1, R)):
                    # the other thread's change may come first (e.g. promoted past it)
                    with contextlib.suppress(InvalidState):
                        backend.set_state(key, version, state)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=churn, args=(x,)) for x in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(RUN_LIMIT)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    info = a.describe(key)
    assert [v.state for v in info.versions].count(VersionState.ACTIVE) == 1
    assert info.latest == 9
    assert "lease" not in record(bao, key)


HOLDER = """
import sys, time
from signerd.backends.vault import from_config
from signerd.wire import KeyName
import json
backend = from_config(json.loads(sys.argv[1]))
held = backend.leases.acquire(KeyName(sys.argv[2], sys.argv[3]), "rotate")
print("held", flush=True)
time.sleep(600)
"""


def test_lease_of_a_killed_holder_is_taken_over_after_its_time(
    bao: BaoServer, make: Any, key: KeyName, tmp_path: Path
) -> None:
    """A killed holder's lease delays others (503 meanwhile) by about its time to live."""
    timeout = 0.5  # lease 2 s, a change waits 0.5 s for it
    make().create(key)
    cfg = json.dumps(vault_backend_config(bao, timeout=timeout))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, cfg, key.tenant, key.name],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()
        holder.wait(10)
    killed = time.monotonic()
    backend = make(timeout=timeout)
    with pytest.raises(BackendUnavailable):
        backend.rotate(key, pending=False)
    info = wait_until(lambda: _rotated(backend, key), 30, "the dead holder's lease to expire")
    waited = time.monotonic() - killed
    assert info.made == 2
    assert 4 * timeout * 0.9 <= waited < 30
    assert "lease" not in record(bao, key)


def _rotated(backend: VaultBackend, key: KeyName) -> Any:
    try:
        return backend.rotate(key, pending=False)
    except BackendUnavailable:
        return None


def test_long_expired_lease_is_taken_over_at_once(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A lease expired a whole time to live ago (holder long gone) is taken over at once."""
    backend = make()
    backend.create(key)
    data = record(bao, key)
    data["lease"] = {
        "holder": "gone:1",
        "nonce": "ab" * 16,
        "op": "rotate",
        "ttl_ms": 20_000,
        "expires": int(time.time() * 1000) - 60_000,
    }
    bao.api("POST", f"secret/data/transit/signerd-{key.tenant}.{key.name}", {"data": data})
    began = time.monotonic()
    assert backend.rotate(key, pending=False).made == 2
    assert time.monotonic() - began < 5  # the wait for a live lease is 5 s
    assert "lease" not in record(bao, key)


def test_holder_whose_lease_was_taken_over_cannot_write_the_record(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """A holder whose lease was taken over can neither write the record nor release it."""
    a, b = make(), make(timeout=0.5)
    a.create(key)
    a.rotate(key, pending=False)
    held = a.leases.acquire(key, "set_state")
    data = record(bao, key)
    data["lease"] = {**data["lease"], "holder": "other:2", "nonce": "cd" * 16}
    bao.api("POST", f"secret/data/transit/signerd-{key.tenant}.{key.name}", {"data": data})
    with pytest.raises(BackendUnavailable):
        a.leases.update(held, lambda m: m)
    a.leases.release(held)
    assert record(bao, key)["lease"]["nonce"] == "cd" * 16
    began = time.monotonic()
    with pytest.raises(BackendUnavailable):  # b waits its timeout for the live lease
        b.rotate(key, pending=False)
    assert 0.5 * 0.9 <= time.monotonic() - began < 5


def test_rotation_outside_the_lease_is_not_named(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A rotate beside one that ignores the lease is refused rather than naming a guess."""
    backend = make()
    backend.create(key)
    guard = backend.leases.guard
    outside = [0]

    def rotate_outside_first(held: Any) -> None:
        if not outside[0]:
            outside[0] = 1
            bao.api("POST", f"transit/keys/signerd-{key.tenant}.{key.name}/rotate", {})
        guard(held)

    backend.leases.guard = rotate_outside_first
    with pytest.raises(BackendError) as caught:
        backend.rotate(key, pending=False)
    assert type(caught.value) is BackendError
    assert backend.describe(key).latest == 3
    assert "lease" not in record(bao, key)


def test_holder_out_of_time_makes_no_transit_change(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """A holder whose lease has too little time left for a transit call answers 503, no change."""
    backend = make(timeout=0.5)  # lease 2 s, a transit call needs 1 s of it left
    backend.create(key)
    read = backend._read_transit

    def slow_read(k: KeyName) -> Any:
        time.sleep(1.2)  # as slow as a loaded Vault
        return read(k)

    backend._read_transit = slow_read
    with pytest.raises(BackendUnavailable):
        backend.rotate(key, pending=False)
    assert bao.transit_key(f"signerd-{key.tenant}.{key.name}")["latest_version"] == 1
    assert "lease" not in record(bao, key)


def test_rotate_reads_no_record_and_a_sign_makes_no_kv_call(
    bao: BaoServer, make: Any, key: KeyName
) -> None:
    """A rotate writes the record three times (lease, times, release) and reads it never."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        backend.describe(key)  # as a running daemon has: the record was read before
        proxy.forwarded.clear()
        backend.rotate(key, pending=False)
        rotate = [line.split(b" ")[:2] for line in proxy.forwarded]
        proxy.forwarded.clear()
        assert isinstance(backend.sign(key, 2, [b"m"])[0], bytes)
        sign = [line.split(b" ")[:2] for line in proxy.forwarded]
    name = f"signerd-{key.tenant}.{key.name}".encode()
    record_path = b"/v1/secret/data/transit/" + name
    assert rotate == [
        [b"POST", record_path],
        [b"GET", b"/v1/transit/keys/" + name],
        [b"POST", b"/v1/transit/keys/" + name + b"/rotate"],
        [b"GET", b"/v1/transit/keys/" + name],
        [b"POST", record_path],  # the versions' state-change times
        [b"POST", record_path],
    ]
    assert sign == [[b"POST", b"/v1/transit/sign/" + name]]


def test_new_kv_mount_upgrading_is_unavailable() -> None:
    """A KV v2 mount still upgrading (just mounted) is unavailable (503), not an error."""
    upgrading = hvac.exceptions.InvalidRequest(
        errors=[
            "Upgrading from non-versioned to versioned data. This backend will be "
            "unavailable for a brief period and will resume service shortly."
        ]
    )
    assert type(translate(upgrading, "request")) is BackendUnavailable
    other = hvac.exceptions.InvalidRequest(errors=["something else"])
    assert type(translate(other, "request")) is BackendError


def test_malformed_lease_is_refused_not_trusted(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A record whose lease is malformed (bad nonce, or a time to live over an hour) is refused."""
    backend = make()
    backend.create(key)
    good = {"holder": "h:1", "nonce": "ab" * 16, "op": "rotate", "ttl_ms": 20_000, "expires": 1}
    for bad in ({"nonce": "x\n"}, {"ttl_ms": 3_600_001}, {"holder": "h 1"}):
        data = {**record(bao, key), "lease": {**good, **bad}}
        bao.api("POST", f"secret/data/transit/signerd-{key.tenant}.{key.name}", {"data": data})
        with pytest.raises(BackendError) as caught:
            backend.describe(key)
        assert type(caught.value) is BackendError
        with pytest.raises(BackendError):
            backend.rotate(key, pending=False)
    assert bao.transit_key(f"signerd-{key.tenant}.{key.name}")["latest_version"] == 1
