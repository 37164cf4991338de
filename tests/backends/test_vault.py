"""The Vault / OpenBao transit backend against a real ``bao server -dev``."""

from __future__ import annotations

import base64
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.backends import Destroyer, KeyInfo, VersionState, load_factory
from signerd.backends.vault import VaultBackend, from_config
from signerd.backends.vault._sign import parse_signature as _signature
from signerd.errors import (
    BackendError,
    BackendUnavailable,
    InvalidState,
    KeyExists,
    UnknownKey,
    UnknownVersion,
)
from signerd.wire import KeyName

from ..conftest import unique
from ..support.openbao import (
    BaoServer,
    FaultProxy,
    dev_server,
    free_port_pair,
    vault_backend_config,
)

A, V, P, R, D = (
    VersionState.ACTIVE,
    VersionState.VERIFY_ONLY,
    VersionState.PENDING,
    VersionState.RETIRED,
    VersionState.DESTROYED,
)


@pytest.fixture
def backend(make: Any) -> VaultBackend:
    b: VaultBackend = make()
    return b


@pytest.fixture
def key() -> KeyName:
    return KeyName(unique("vt"), "feedback")


def states(info: KeyInfo) -> list[VersionState]:
    return [v.state for v in info.versions]


def transit_name(key: KeyName) -> str:
    return f"signerd-{key.tenant}.{key.name}"


def verifies(public: bytes, signature: bytes | Exception, data: bytes) -> bool:
    if not isinstance(signature, bytes):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except Exception:
        return False
    return True


# --- configuration ---


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"addr": "ftp://127.0.0.1:8200"}, "addr"),
        ({"addr": "http://127.0.0.1:8200/v1"}, "addr"),
        ({"addr": None}, "addr"),
        ({"token_file": "/nonexistent/token"}, "token_file"),
        ({"token_file": None}, "token_file"),
        ({"approle_role_id_file": "__token__"}, "token_file"),
        ({"token_file": None, "approle_role_id_file": "__token__"}, "approle_secret_id_file"),
        ({"mount": "bad mount"}, "mount"),
        ({"tenant_mounts": {"Bad": "x"}}, "tenant_mounts"),
        ({"tenant_mounts": {"acme": "a b"}}, "tenant_mounts.acme"),
        ({"key_prefix": "a/b"}, "key_prefix"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": "5"}, "timeout"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"ca_file": "__token__"}, "ca_file"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_bad_config_names_the_key(bao: BaoServer, overrides: dict[str, Any], named: str) -> None:
    """A bad configuration value raises ValueError whose message starts with the key's name."""
    cfg = vault_backend_config(bao)
    readable = cfg["token_file"]
    for k, v in overrides.items():
        cfg[k] = readable if v == "__token__" else v
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(ValueError, match=rf"^{named}: "):
        from_config(cfg)


def test_registered_as_vault_type(bao: BaoServer) -> None:
    """The backend registry builds this backend for type "vault"."""
    backend = load_factory("vault")(vault_backend_config(bao))
    try:
        assert isinstance(backend, VaultBackend)
        assert isinstance(backend, Destroyer)
        assert backend.max_concurrency > 1
    finally:
        backend.close()


# --- the mapping onto transit ---


def test_create_is_a_non_exportable_ed25519_transit_key(
    bao: BaoServer, backend: VaultBackend, key: KeyName
) -> None:
    """create makes an ed25519 transit key with exportable and plaintext backup off."""
    info = backend.create(key)
    t = bao.transit_key(transit_name(key))
    assert (t["type"], t["exportable"], t["allow_plaintext_backup"]) == ("ed25519", False, False)
    assert t["latest_version"] == 1
    assert info.versions[0].public_key == base64.b64decode(t["keys"]["1"]["public_key"])
    with pytest.raises(KeyExists):
        backend.create(key)


def test_versions_are_transit_versions(bao: BaoServer, backend: VaultBackend, key: KeyName) -> None:
    """Each kid version is the transit version with the same public key and creation time."""
    backend.create(key)
    backend.rotate(key, pending=False)
    info = backend.rotate(key, pending=False)
    t = bao.transit_key(transit_name(key))
    assert t["latest_version"] == info.latest == 3
    assert states(info) == [V, V, A]
    for v in info.versions:
        assert v.kid == key.kid(v.version)
        assert v.public_key == base64.b64decode(t["keys"][str(v.version)]["public_key"])
        assert abs(v.created_at - time.time()) < 120


def test_pending_is_pinned_in_transit(bao: BaoServer, backend: VaultBackend, key: KeyName) -> None:
    """A pending rotation pins min_encryption_version to the active one; promote moves the pin."""
    backend.create(key)
    info = backend.rotate(key, pending=True)
    assert states(info) == [A, P]
    assert bao.transit_key(transit_name(key))["min_encryption_version"] == 1
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)
    info = backend.set_state(key, 2, A)
    assert states(info) == [V, A]
    assert bao.transit_key(transit_name(key))["min_encryption_version"] == 2
    with pytest.raises(InvalidState):
        backend.sign(key, 1, [b"x"])  # Vault itself refuses the demoted version


def test_rotate_after_promote_is_one_step(
    bao: BaoServer, backend: VaultBackend, key: KeyName
) -> None:
    """A plain rotation after a promotion unpins, so the new version is active at once."""
    backend.create(key)
    backend.rotate(key, pending=True)
    backend.set_state(key, 2, A)
    info = backend.rotate(key, pending=False)
    assert states(info) == [V, V, A]
    assert bao.transit_key(transit_name(key))["min_encryption_version"] == 0


def test_retire_in_order_raises_the_floor(
    bao: BaoServer, backend: VaultBackend, key: KeyName
) -> None:
    """Retiring the oldest version raises min_decryption_version; its public key stays described."""
    first = backend.create(key)
    backend.rotate(key, pending=False)
    info = backend.set_state(key, 1, R)
    assert states(info) == [R, A]
    t = bao.transit_key(transit_name(key))
    assert t["min_decryption_version"] == 2
    assert "1" not in t["keys"]  # archived by transit: the record keeps the public key
    assert info.versions[0].public_key == first.versions[0].public_key


def test_retire_out_of_order_uses_the_record(
    bao: BaoServer, backend: VaultBackend, key: KeyName
) -> None:
    """Retiring v2 while v1 verifies is kept in the metadata record, then folded into the floor."""
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.rotate(key, pending=False)
    info = backend.set_state(key, 2, R)
    assert states(info) == [V, R, A]
    assert bao.transit_key(transit_name(key))["min_decryption_version"] == 1
    record = bao.api("GET", f"secret/data/transit/{transit_name(key)}")["data"]["data"]
    assert record["retired"] == [2]
    info = backend.set_state(key, 1, R)
    assert states(info) == [R, R, A]
    assert bao.transit_key(transit_name(key))["min_decryption_version"] == 3


def test_retire_pending_version(backend: VaultBackend, key: KeyName) -> None:
    """A pending version can be retired; the active one keeps signing."""
    backend.create(key)
    backend.rotate(key, pending=True)
    info = backend.set_state(key, 2, R)
    assert states(info) == [A, R]
    assert isinstance(backend.sign(key, 1, [b"x"])[0], bytes)


def test_active_cannot_be_retired(backend: VaultBackend, key: KeyName) -> None:
    """Retiring the active version is InvalidState and changes nothing."""
    info = backend.create(key)
    with pytest.raises(InvalidState):
        backend.set_state(key, 1, R)
    assert backend.describe(key) == info


def test_destroy_trims_transit(bao: BaoServer, backend: VaultBackend, key: KeyName) -> None:
    """destroy raises min_available_version: the material is gone from transit, the kid stays."""
    first = backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, R)
    info = backend.destroy(key, 1)
    assert states(info) == [D, A]
    assert info.versions[0].public_key == first.versions[0].public_key
    t = bao.transit_key(transit_name(key))
    assert t["min_available_version"] == 2
    assert sorted(t["keys"]) == ["2"]
    answer = bao.api(
        "POST", f"transit/sign/{transit_name(key)}", {"key_version": 1, "input": ""}, ok=(400, 500)
    )
    assert answer["errors"]
    assert backend.destroy(key, 1) == info  # again: nothing more to do


def test_destroy_only_from_the_oldest(backend: VaultBackend, key: KeyName) -> None:
    """Transit trims from the bottom: destroying v2 while v1 is not destroyed is InvalidState."""
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, R)
    backend.set_state(key, 2, R)
    before = backend.describe(key)
    with pytest.raises(InvalidState, match="oldest"):
        backend.destroy(key, 2)
    assert backend.describe(key) == before
    backend.destroy(key, 1)
    assert states(backend.destroy(key, 2)) == [D, D, A]


def test_destroy_needs_retired(backend: VaultBackend, key: KeyName) -> None:
    """A verify-only version cannot be destroyed before it is retired."""
    backend.create(key)
    backend.rotate(key, pending=False)
    with pytest.raises(InvalidState):
        backend.destroy(key, 1)


def test_rotate_after_destroy_pins_the_new_version(
    bao: BaoServer, backend: VaultBackend, key: KeyName
) -> None:
    """After a trim transit keeps a pin; a rotation still ends with the new version active."""
    backend.create(key)
    backend.rotate(key, pending=False)
    backend.set_state(key, 1, R)
    backend.destroy(key, 1)
    info = backend.rotate(key, pending=False)
    assert states(info) == [D, V, A]
    assert bao.transit_key(transit_name(key))["min_encryption_version"] == 3
    assert isinstance(backend.sign(key, 3, [b"x"])[0], bytes)


def test_unknown_key_and_version(backend: VaultBackend, key: KeyName) -> None:
    """A missing key is UnknownKey for every operation; a missing version is UnknownVersion."""
    with pytest.raises(UnknownKey):
        backend.describe(key)
    with pytest.raises(UnknownKey):
        backend.sign(key, 1, [b"x"])
    with pytest.raises(UnknownKey):
        backend.rotate(key, pending=False)
    backend.create(key)
    with pytest.raises(UnknownVersion):
        backend.sign(key, 5, [b"x"])
    with pytest.raises(UnknownVersion):
        backend.set_state(key, 5, R)


def test_foreign_key_type_is_backend_error(bao: BaoServer, backend: VaultBackend) -> None:
    """A transit key of another type under signerd's name is a BackendError, not a crash."""
    key = KeyName(unique("vt"), "aes")
    bao.api("POST", f"transit/keys/{transit_name(key)}", {"type": "aes256-gcm96"})
    with pytest.raises(BackendError):
        backend.describe(key)


# --- signing ---


def test_sign_names_the_version(make: Any, key: KeyName) -> None:
    """A sign for v1 is made by v1 even after another daemon rotated to v2."""
    a, b = make(), make()
    info = a.create(key)
    rotated = b.rotate(key, pending=False)
    sig = a.sign(key, 1, [b"data"])[0]
    assert verifies(info.versions[0].public_key, sig, b"data")
    assert not verifies(rotated.versions[1].public_key, sig, b"data")


def test_version_prefix_is_checked(bao: BaoServer, make: Any, key: KeyName) -> None:
    """A signature that comes back tagged with another version is refused per item."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        proxied = make(addr=proxy.addr)
        assert isinstance(proxied.sign(key, 1, [b"x"])[0], bytes)
        proxy.rewrite(b'"vault:v1:', b'"vault:v2:')
        results = proxied.sign(key, 1, [b"x", b"y"])
    assert [type(r) for r in results] == [BackendError, BackendError]


def test_signature_parsing() -> None:
    """Malformed signature answers become per-item BackendErrors with a noted cause."""
    good = "vault:v3:" + base64.b64encode(bytes(64)).decode()
    causes: list[str] = []
    assert _signature({"signature": good}, 3, causes) == bytes(64)
    assert causes == []
    bad_answers: tuple[dict[str, str] | None, ...] = (
        {"signature": good.replace("v3", "v2")},
        {"signature": "vault:v3:!!"},
        {"signature": "vault:v3:" + base64.b64encode(bytes(10)).decode()},
        {"signature": "v3:" + base64.b64encode(bytes(64)).decode()},
        {},
        None,
        {"error": "something odd"},
    )
    for bad in bad_answers:
        assert isinstance(_signature(bad, 3, causes), BackendError), bad
    assert len(causes) == len(bad_answers)
    refused = {"error": "requested version for signing is less than the minimum encryption"}
    assert isinstance(_signature(refused, 3, causes), InvalidState)
    trimmed = {"error": "1 error occurred: * no such key version"}  # destroyed elsewhere
    assert isinstance(_signature(trimmed, 3, causes), UnknownVersion)


def test_batch_sign_answers_item_by_item(backend: VaultBackend, key: KeyName) -> None:
    """A batch of 100 comes back in order, each signature valid for its own item."""
    info = backend.create(key)
    items = [f"item-{i}".encode() * (i % 7 + 1) for i in range(100)] + [b""]
    results = backend.sign(key, 1, items)
    assert len(results) == len(items)
    public = info.versions[0].public_key
    assert all(verifies(public, sig, item) for sig, item in zip(results, items, strict=True))
    assert not verifies(public, results[0], items[1])


def test_batch_errors_stay_in_place(backend: VaultBackend, key: KeyName) -> None:
    """When Vault refuses the items of a batch, each item carries its own typed error."""
    backend.create(key)
    backend.rotate(key, pending=True)
    backend.set_state(key, 2, A)  # v1 is now below Vault's pin
    results = backend.sign(key, 1, [b"a", b"b", b"c"])
    assert [type(r) for r in results] == [InvalidState] * 3


def test_single_empty_item(backend: VaultBackend, key: KeyName) -> None:
    """An empty message signs and verifies (input "" is valid for transit)."""
    info = backend.create(key)
    (sig,) = backend.sign(key, 1, [b""])
    assert verifies(info.versions[0].public_key, sig, b"")
    assert backend.sign(key, 1, []) == []


def test_batch_is_cheaper_per_signature(backend: VaultBackend, key: KeyName) -> None:
    """One batch of 100 costs far less per signature than 100 single signs (measured)."""
    backend.create(key)
    items = [b"x" * 64] * 100
    backend.sign(key, 1, items[:2])
    start = time.perf_counter()
    for item in items[:30]:
        backend.sign(key, 1, [item])
    single = (time.perf_counter() - start) / 30
    start = time.perf_counter()
    for _ in range(5):
        backend.sign(key, 1, items)
    batched = (time.perf_counter() - start) / 500
    logging.getLogger("test").info(
        "single %.0f us, batch-100 %.0f us/sig", single * 1e6, batched * 1e6
    )
    assert batched * 3 < single


def test_concurrent_signing_from_threads(backend: VaultBackend, key: KeyName) -> None:
    """max_concurrency threads signing at once through one backend all succeed."""
    info = backend.create(key)
    errors: list[BaseException] = []
    bad: list[bytes] = []

    def worker(n: int) -> None:
        try:
            for i in range(20):
                data = f"{n}-{i}".encode()
                batch = [data, data + b"!"] if i % 2 else [data]
                for item, sig in zip(batch, backend.sign(key, 1, batch), strict=True):
                    if not verifies(info.versions[0].public_key, sig, item):
                        bad.append(item)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(backend.max_concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and bad == []


# --- tenants, several daemons ---


def test_tenant_in_its_own_mount(bao: BaoServer, make: Any) -> None:
    """A tenant listed in tenant_mounts keeps its keys in its own transit mount."""
    tenant = unique("own")
    mount = f"transit-{tenant}"
    bao.enable_transit(mount)
    backend = make(tenant_mounts={tenant: mount})
    key = KeyName(tenant, "feedback")
    backend.create(key)
    assert bao.transit_key(transit_name(key), mount=mount)["type"] == "ed25519"
    bao.api("GET", f"transit/keys/{transit_name(key)}", ok=(404,))
    # a stray key under the same name in the shared mount is not this tenant's
    bao.api("POST", f"transit/keys/{transit_name(KeyName(tenant, 'stray'))}", {"type": "ed25519"})
    listed = [i.key for i in backend.list_keys() if i.key.tenant == tenant]
    assert listed == [key]
    plain = make()  # a daemon without the mapping looks in the shared mount only
    with pytest.raises(UnknownKey):
        plain.describe(key)


def test_two_daemons_agree(make: Any, key: KeyName) -> None:
    """Pending, out-of-order retired and destroyed states written by one are read by another."""
    a, b = make(), make()
    a.create(key)
    a.rotate(key, pending=False)
    a.rotate(key, pending=False)
    a.rotate(key, pending=True)
    a.set_state(key, 2, R)
    a.set_state(key, 1, R)
    a.destroy(key, 1)
    mine = a.set_state(key, 4, R)
    assert states(mine) == [D, R, A, R]
    assert b.describe(key) == mine
    assert {i.key: i for i in b.list_keys()}[key] == mine


# --- authentication and transport ---


def test_approle_login(bao: BaoServer, make: Any, key: KeyName, tmp_path: Path) -> None:
    """AppRole: role id and secret id from files, a policy-limited token, signs and rotates."""
    bao.write_policy(
        "signerd-test",
        """
path "transit/keys" { capabilities = ["list"] }
path "transit/keys/*" { capabilities = ["create", "read", "update"] }
path "transit/sign/*" { capabilities = ["update"] }
path "secret/data/transit/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/transit/*" { capabilities = ["read"] }
""",
    )
    role_id, secret_id = bao.enable_approle("signerd", policies="signerd-test", token_ttl="1h")
    (tmp_path / "role").write_text(role_id)
    (tmp_path / "secret").write_text(secret_id + "\n")
    backend = make(
        token_file=None,
        approle_role_id_file=str(tmp_path / "role"),
        approle_secret_id_file=str(tmp_path / "secret"),
    )
    info = backend.create(key)
    assert verifies(info.versions[0].public_key, backend.sign(key, 1, [b"m"])[0], b"m")
    backend.rotate(key, pending=True)
    backend.set_state(key, 2, A)
    backend.set_state(key, 1, R)
    backend.check()
    assert backend.transport.auth.login_attempts == 1
    bao.enable_transit("elsewhere-" + key.tenant)
    with pytest.raises(BackendUnavailable):  # the policy stops at transit/
        make(
            token_file=None,
            approle_role_id_file=str(tmp_path / "role"),
            approle_secret_id_file=str(tmp_path / "secret"),
            mount="elsewhere-" + key.tenant,
        ).create(key)


def test_bad_token_is_unavailable_and_never_logged(
    bao: BaoServer, make: Any, key: KeyName, caplog: pytest.LogCaptureFixture
) -> None:
    """A token Vault refuses gives BackendUnavailable; neither error nor log carries it."""
    secret = "s.not-a-real-token-" + unique()
    backend = make(token=secret)
    caplog.set_level(logging.DEBUG)
    for call in (lambda: backend.describe(key), backend.check):
        with pytest.raises(BackendUnavailable) as caught:
            call()
        assert secret not in str(caught.value)
    assert secret not in caplog.text
    assert "signerd.vault" in caplog.text


def test_rotate_answer_lost_makes_one_version(bao: BaoServer, make: Any, key: KeyName) -> None:
    """Vault rotated but the answer was lost: signerd sees that and does not rotate again."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        proxy.drop_answer(b"/rotate")
        info = backend.rotate(key, pending=False)
        rotates = [line for line in proxy.forwarded if b"/rotate" in line]
    assert proxy.dropped and len(rotates) == 1
    assert states(info) == [V, A]
    assert bao.transit_key(transit_name(key))["latest_version"] == 2


def test_rotate_request_lost_is_retried(bao: BaoServer, make: Any, key: KeyName) -> None:
    """The rotate never reached Vault: signerd checks, retries once, and makes one version."""
    make().create(key)
    with FaultProxy(bao.addr) as proxy:
        backend = make(addr=proxy.addr)
        backend.describe(key)  # a kept-alive connection, as in a running daemon
        proxy.drop_request(b"/rotate")
        info = backend.rotate(key, pending=False)
        rotates = [line for line in proxy.forwarded if b"/rotate" in line]
    assert proxy.dropped and len(rotates) == 1
    assert states(info) == [V, A]
    assert bao.transit_key(transit_name(key))["latest_version"] == 2


def test_namespace(bao: BaoServer, make: Any, key: KeyName) -> None:
    """With namespace set, keys live in that Vault namespace and nowhere else."""
    ns = unique("ns")
    bao.api("POST", f"sys/namespaces/{ns}", {})
    bao.enable_transit("transit", namespace=ns)
    bao.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}}, namespace=ns)
    backend = make(namespace=ns)
    backend.check()
    backend.create(key)
    backend.rotate(key, pending=True)
    assert states(backend.describe(key)) == [A, P]
    bao.api("GET", f"transit/keys/{transit_name(key)}", namespace=ns)
    bao.api("GET", f"transit/keys/{transit_name(key)}", ok=(404,))


def test_https_with_ca_file(tmp_path: Path, key: KeyName) -> None:
    """Over HTTPS the configured CA bundle is used; without it the server is not trusted."""
    with dev_server(tmp_path / "tls", tls=True) as server:
        assert server.addr.startswith("https://")
        trusted = from_config(vault_backend_config(server))
        untrusted = from_config(vault_backend_config(server, ca_file=None))
        try:
            info = trusted.create(key)
            assert verifies(info.versions[0].public_key, trusted.sign(key, 1, [b"t"])[0], b"t")
            trusted.check()
            with pytest.raises(BackendUnavailable):
                untrusted.describe(key)
        finally:
            trusted.close()
            untrusted.close()


def test_check_healthy(backend: VaultBackend) -> None:
    """check() passes against a reachable, unsealed Vault with a valid token."""
    backend.check()


def test_from_config_does_not_connect(bao: BaoServer, key: KeyName) -> None:
    """Building the backend needs no Vault; the first call to a dead address is unavailable."""
    backend = from_config(vault_backend_config(bao, addr=f"http://127.0.0.1:{free_port_pair()}"))
    try:
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            backend.describe(key)
        with pytest.raises(BackendUnavailable):
            backend.check()
        assert time.monotonic() - start < 5
    finally:
        backend.close()
