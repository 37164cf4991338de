"""The keyring is never forgotten because of an error: a real daemon on a SoftHSM token starved of fds."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from signerd.backends.pkcs11 import from_config
from signerd.testing import wait_until
from signerd.wire import KeyName

from ..conftest import DaemonProcess, pkcs11_backend_config, start_daemon, unique
from ..support.rawhttp import Reply, _UnixConnection, request

pytestmark = pytest.mark.timeout(120)


class KeepAlive:
    """One HTTP/1.1 connection opened before the daemon runs out of fds, reused meanwhile."""

    def __init__(self, sock: Path) -> None:
        self.conn = _UnixConnection(str(sock), 10.0)

    def __call__(self, method: str, url: str, body: Any = None) -> Reply:
        payload = json.dumps(body).encode() if body is not None else None
        self.conn.request(method, url, body=payload, headers={"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())

    def close(self) -> None:
        self.conn.close()


def _sign(call: Any, key: str, data: bytes = b"x") -> Reply:
    reply: Reply = call("POST", "/v1/sign", {"key": key, "data": base64.b64encode(data).decode()})
    return reply


def _kids(call: Any, tenant: str) -> set[str]:
    reply = call("GET", f"/v1/jwks?tenant={tenant}")
    assert reply.status == 200, reply.body
    return {k["kid"] for k in reply.json["keys"]}


@contextmanager
def starved(pid: int) -> Iterator[None]:
    """Lower the daemon's RLIMIT_NOFILE to its lowest free fd, once the connections it was
    closing are closed: no file can be opened (a new fd is always the lowest free one)."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    lowest = _lowest_free_fd(pid)
    subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={lowest}:{hard}"], check=True)
    try:
        yield
    finally:
        subprocess.run(["prlimit", f"--pid={pid}", f"--nofile={soft}:{hard}"], check=True)


def _lowest_free_fd(pid: int) -> int:
    """The lowest fd number ``pid`` has free, once its fds stayed the same for 0.3 s."""
    seen: set[int] | None = None
    deadline = time.monotonic() + 5.0
    while True:
        fds = {int(n) for n in os.listdir(f"/proc/{pid}/fd")}
        if fds == seen or time.monotonic() > deadline:
            return min(set(range(len(fds) + 1)) - fds)
        seen = fds
        time.sleep(0.3)


def _touch_token(tenant: str) -> None:
    """Change the token from another process, as another daemon would (SoftHSM re-reads then)."""
    backend = from_config(pkcs11_backend_config())
    try:
        backend.create(KeyName(tenant, unique("other")))
    finally:
        backend.close()


@pytest.fixture
def busy_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon (one process: the tests starve and read its one cache) refreshing twice a second."""
    d = start_daemon(tmp_path / "d", server={"workers": 1}, keys={"refresh_interval": 0.5})
    yield d
    d.stop()


def test_fd_starvation_keeps_the_keyring_and_recovers_without_restart(
    busy_daemon: DaemonProcess,
) -> None:
    """Starved of fds: signs 503 (never 404), JWKS and listing keep every kid, not ready; then all back."""
    d = busy_daemon
    sock = str(d.socket_path)
    tenant = unique("kr")
    keys = [f"{tenant}/k{i}" for i in range(3)]
    for key in keys:
        assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201
        assert _sign(lambda *a: request(sock, *a), key).status == 200
    kids = _kids(lambda *a: request(sock, *a), tenant)
    assert len(kids) == 3
    conns = [KeepAlive(d.socket_path) for _ in range(4)]
    try:
        for c in conns:
            assert c("GET", "/v1/health").status == 200
        with starved(d.proc.pid):
            _touch_token(unique("kt"))
            # The periodic refresh is the first to meet the starved token: SoftHSM lists nothing.
            wait_until(
                lambda: "signerd.keyring_suspect" in d.log_text(),
                20.0,
                "the empty listing met",
                0.2,
            )
            deadline = time.monotonic() + 2.0
            signs: list[int] = []
            while time.monotonic() < deadline:
                reply = _sign(conns[0], keys[len(signs) % 3])
                assert reply.status in (200, 503), (reply.status, reply.body)
                if reply.status == 503:
                    assert reply.code == "backend_unavailable", reply.body
                signs.append(reply.status)
                assert _kids(conns[1], tenant) == kids
                time.sleep(0.1)
            assert 503 in signs, signs
            ready = conns[2]("GET", "/v1/ready")
            assert ready.status == 503, ready.body
        plain = functools.partial(request, sock)
        wait_until(lambda: plain("GET", "/v1/ready").status == 200, 20.0, "ready again", 0.2)
        for key in keys:
            assert _sign(plain, key).status == 200
        assert _kids(plain, tenant) == kids
        listed = plain("GET", f"/v1/keys?tenant={tenant}")
        assert listed.status == 200 and len(listed.json["keys"]) == 3, listed.body
    finally:
        for c in conns:
            c.close()
    d.stop()
    counters = _counters(d.log_text())
    assert counters["recoveries"] >= 1, counters  # the empty listing was met and not believed
    assert counters["forgotten"] == 0, counters
    assert "signerd.keyring_kept" in d.log_text()


def _counters(log: str) -> dict[str, int]:
    line = [x for x in log.splitlines() if "signerd.keys.counters" in x][-1]
    fields = line.split("signerd.keys.counters", 1)[1]  # after the ts=, level=, logger= prefix
    return {k: int(v) for k, v in (f.split("=") for f in fields.split() if "=" in f)}


def _remove_labels(labels: list[str]) -> None:
    """Delete token objects by label behind signerd's back, from this process."""
    import pkcs11
    from pkcs11 import Attribute

    from ..conftest import PIN_FILE, SOFTHSM_MODULE, TOKEN_LABEL

    token = pkcs11.lib(SOFTHSM_MODULE).get_token(token_label=TOKEN_LABEL)
    try:
        session = token.open(rw=True, user_pin=PIN_FILE.read_text().strip())
    except pkcs11.exceptions.UserAlreadyLoggedIn:  # another session of this process is
        session = token.open(rw=True)
    with session:
        for label in labels:
            for obj in list(session.get_objects({Attribute.LABEL: label})):
                obj.destroy()


def _remove_key_objects(key: KeyName, versions: int) -> None:
    """Delete a key from the token behind signerd's back (metadata and key pairs)."""
    labels = [f"signerd/{key.tenant}/{key.name}"] + [key.kid(v) for v in range(1, versions + 1)]
    _remove_labels(labels)


def test_a_key_deleted_from_the_token_is_forgotten_and_the_rest_kept(
    busy_daemon: DaemonProcess,
) -> None:
    """A key whose every object is gone from a healthy token is forgotten; its neighbours stay."""
    d = busy_daemon
    plain = functools.partial(request, str(d.socket_path))
    tenant = unique("kd")
    for name in ("stay", "gone"):
        assert plain("POST", "/v1/keys", {"key": f"{tenant}/{name}"}).status == 201
    assert len(_kids(plain, tenant)) == 2
    _remove_key_objects(KeyName(tenant, "gone"), 1)
    wait_until(lambda: _kids(plain, tenant) == {f"{tenant}.stay.v1"}, 20.0, "forgotten", 0.2)
    assert _sign(plain, f"{tenant}/gone").status == 404
    assert _sign(plain, f"{tenant}/stay").status == 200
    assert plain("GET", "/v1/ready").status == 200
    assert f"signerd.key_gone key={tenant}/gone" in d.log_text()


def test_a_key_whose_metadata_alone_vanished_is_kept(busy_daemon: DaemonProcess) -> None:
    """Metadata gone but key pairs still on the token is no proof: the key is kept, not ready."""
    d = busy_daemon
    plain = functools.partial(request, str(d.socket_path))
    tenant = unique("km")
    assert plain("POST", "/v1/keys", {"key": f"{tenant}/half"}).status == 201
    assert plain("POST", "/v1/keys", {"key": f"{tenant}/whole"}).status == 201
    key = KeyName(tenant, "half")
    _remove_labels([f"signerd/{tenant}/half"])
    wait_until(lambda: plain("GET", "/v1/ready").status == 503, 20.0, "not ready", 0.2)
    assert _kids(plain, tenant) == {key.kid(1), f"{tenant}.whole.v1"}
    assert "signerd.key_gone" not in d.log_text()
    _remove_key_objects(key, 1)  # now the store positively says so: forgotten, ready again
    wait_until(lambda: plain("GET", "/v1/ready").status == 200, 20.0, "ready again", 0.2)
    assert _kids(plain, tenant) == {f"{tenant}.whole.v1"}


def _meta_json(version: int = 1) -> bytes:
    body = {"format": 1, "seq": 1, "versions": {str(version): {"state": "active", "created_at": 1}}}
    return json.dumps(body).encode()


def _plant(tenant: str) -> tuple[str, str]:
    """Write, behind signerd's back, a key named `feedback\\n` (with a key pair) and undecodable metadata."""
    from pkcs11 import Attribute, ObjectClass

    bad_name = f"signerd/{tenant}/feedback\n"
    bad_json = f"signerd/{tenant}/badjson"
    backend = from_config(pkcs11_backend_config())

    def run(session: Any) -> None:
        for label, value in ((bad_name, _meta_json()), (bad_json, b"{not json")):
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.DATA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.APPLICATION: "signerd",
                    Attribute.LABEL: label,
                    Attribute.VALUE: value,
                }
            )
        backend._generate(session, KeyName(tenant, "feedback\n"), 1)

    try:
        backend.on_token(run)
    finally:
        backend.close()
    return bad_name, bad_json


def _labels_on_token(prefix: str) -> list[str]:
    from pkcs11 import Attribute

    backend = from_config(pkcs11_backend_config())
    try:
        return backend.on_token(
            lambda s: sorted(
                str(o[Attribute.LABEL])
                for o in s.get_objects({})
                if str(o[Attribute.LABEL]).startswith(prefix)
                or str(o[Attribute.LABEL]).startswith(f"signerd/{prefix}")
            )
        )
    finally:
        backend.close()


def test_malformed_objects_are_skipped_and_logged_once(busy_daemon: DaemonProcess) -> None:
    """A key named `feedback\\n` and undecodable metadata on the token never fail JWKS or listing."""
    from signerd.backends.pkcs11 import label_digest

    d = busy_daemon
    plain = functools.partial(request, str(d.socket_path))
    tenant = unique("mf")
    assert plain("POST", "/v1/keys", {"key": f"{tenant}/good"}).status == 201
    bad_name, bad_json = _plant(tenant)
    time.sleep(1.5)  # three periodic listings meet the planted objects
    assert plain("GET", "/v1/jwks").status == 200
    assert _kids(plain, tenant) == {f"{tenant}.good.v1"}
    listed = plain("GET", f"/v1/keys?tenant={tenant}")
    assert listed.status == 200, listed.body
    assert [k["key"] for k in listed.json["keys"]] == [f"{tenant}/good"]
    assert plain("GET", "/v1/ready").status == 200
    log = d.log_text()
    for label in (bad_name, bad_json):
        assert log.count(f"label_sha256={label_digest(label)}") == 1, label
    assert "feedback\n" not in log
    _remove_labels([bad_name, bad_json, f"{tenant}.feedback\n.v1"])


def test_purge_invalid_removes_only_keys_with_invalid_names(tmp_path: Path) -> None:
    """`signerctl keys purge-invalid` removes the invalid key's objects, says what, and keeps the rest."""
    import sys

    from ..conftest import ROOT, daemon_config, to_toml

    tenant = unique("pg")
    backend = from_config(pkcs11_backend_config())
    try:
        backend.create(KeyName(tenant, "good"))
    finally:
        backend.close()
    _, bad_json = _plant(tenant)
    config = tmp_path / "signerd.toml"
    config.write_text(to_toml(daemon_config(tmp_path)))

    def signerctl(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "signerd.cli",
            "keys",
            "purge-invalid",
            "--config",
            str(config),
        ]
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=60, cwd=str(ROOT)
        )

    before = _labels_on_token(tenant)
    dry = signerctl("--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len([x for x in dry.stdout.splitlines() if tenant in x]) == 3, dry.stdout
    assert _labels_on_token(tenant) == before
    done = signerctl()
    assert done.returncode == 0, done.stderr
    assert len([x for x in done.stdout.splitlines() if tenant in x]) == 3, done.stdout
    assert repr(f"{tenant}.feedback\n.v1") in done.stdout  # shown escaped to the operator
    assert done.stderr.count("signerd.maint.purged") >= 3, done.stderr
    assert _labels_on_token(tenant) == sorted(
        [bad_json, f"signerd/{tenant}/good", f"{tenant}.good.v1", f"{tenant}.good.v1"]
    )
    again = signerctl()
    assert again.returncode == 0 and tenant not in again.stdout, again.stdout
    _remove_labels([bad_json])


class _Blind:
    """A real SoftHSM backend whose next listings come back empty, as a starved SoftHSM's do."""

    def __init__(self) -> None:
        self.inner = from_config(pkcs11_backend_config())
        self.max_concurrency = 1
        self.blind = 0  # listings still to answer with nothing
        self.recovered = 0

    def list_keys(self) -> list[Any]:
        if self.blind:
            self.blind -= 1
            return []
        return self.inner.list_keys()

    def recover(self) -> None:
        self.recovered += 1
        self.inner.recover()

    def confirm_absent(self, missing: Any, present: Any) -> frozenset[KeyName]:
        return self.inner.confirm_absent(missing, present)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_empty_listing_is_re_read_after_a_reset_and_never_believed() -> None:
    """One empty listing: reset and re-read, nothing lost; two in a row: cache kept, not ready, then healed."""
    from signerd.errors import BackendUnavailable
    from signerd.keys import KeyService, Settings

    blind = _Blind()
    svc = KeyService({"hsm": blind}, default_backend="hsm", settings=Settings(refresh_interval=0))
    await svc.start()
    try:
        key = KeyName(unique("kb"), "feedback")
        await svc.create(key)
        before = {v.kid for v in svc.published()}
        blind.blind = 1
        await svc.refresh_all()
        assert blind.recovered == 1 and svc.counters.recoveries == 1
        assert {v.kid for v in svc.published()} == before
        await svc.ready()
        blind.blind = 2
        with pytest.raises(BackendUnavailable):
            await svc.refresh_all()
        assert {v.kid for v in svc.published()} == before
        assert svc.counters.forgotten == []
        await asyncio.sleep(1.1)  # the ready answer ages out; the background re-read heals
        await svc.ready()
        assert (await svc.sign(key, b"x"))[0] == key.kid(1)
    finally:
        await svc.close()


async def test_a_fresh_re_read_does_not_delay_the_lookup_of_a_new_kid() -> None:
    """A kid made elsewhere just after this process re-read its key is found at its first
    verify; unknown kids of one key still cost at most one read per unknown_kid_refresh."""
    from signerd.errors import UnknownKid
    from signerd.keys import KeyService, Settings

    settings = Settings(refresh_interval=0, unknown_kid_refresh=30.0)
    here = KeyService(
        {"hsm": from_config(pkcs11_backend_config())}, default_backend="hsm", settings=settings
    )
    elsewhere = KeyService(
        {"hsm": from_config(pkcs11_backend_config())}, default_backend="hsm", settings=settings
    )
    await here.start()
    await elsewhere.start()
    try:
        key = KeyName(unique("kf"), "k")
        await elsewhere.create(key)
        await here.refresh_all()  # the cache's own re-read, just before the rotate
        await elsewhere.rotate(key)
        found, version = await here.lookup_kid(key.kid(2))
        assert (found, version.version) == (key, 2)
        reads = here.counters.key_reads
        for _ in range(3):  # the interval's one read went to v2: no read at all
            with pytest.raises(UnknownKid):
                await here.lookup_kid(key.kid(99))
        assert here.counters.key_reads == reads
    finally:
        await here.close()
        await elsewhere.close()
