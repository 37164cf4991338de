"""SIGHUP reloads the domain map and ``[federation]``, all or nothing, in every worker.

A two-worker signerd with the session's SoftHSM token and a real OpenBao dev
server. Moving a tenant to the other backend takes effect in both workers: its
keys in the old domain are no longer served, listed or published, and a key made
afterwards is made in the new one. A reload that also changes what needs a restart
(a backend, the nonce store) is refused whole: map, policy and trusted keys stay.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import DaemonProcess, daemon_config, start_daemon, to_toml, unique, wait_until
from ..support.rawhttp import Reply, request

pytestmark = pytest.mark.timeout(180)

WORKERS = {"workers": 2}
_Hup = tuple[DaemonProcess, str, dict[str, Any]]  # the daemon, the tenant, the backends


def _call(d: DaemonProcess, method: str, url: str, body: Any = None) -> Reply:
    return request(str(d.socket_path), method, url, body, timeout=20)


def _sign(d: DaemonProcess, key: str) -> Reply:
    return _call(d, "POST", "/v1/sign", {"key": key, "data": base64.b64encode(b"hup").decode()})


def _published(d: DaemonProcess, tenant: str) -> list[str]:
    return sorted(k["kid"] for k in _call(d, "GET", f"/v1/jwks?tenant={tenant}").json["keys"])


def _rewrite(d: DaemonProcess, **overrides: Any) -> None:
    d.config_path.write_text(to_toml(daemon_config(d.dir, server=WORKERS, **overrides)))


@pytest.fixture
def hup(tmp_path: Path, openbao_backend_config: dict[str, Any]) -> Iterator[_Hup]:
    tenant = unique("hup")
    backends = {"hsm": daemon_config(tmp_path)["backends"]["hsm"], "bao": openbao_backend_config}
    d = start_daemon(
        tmp_path / "d",
        server=WORKERS,
        backends=backends,
        tenants={tenant: {"backend": "hsm"}},
    )
    try:
        yield d, tenant, backends
    finally:
        d.stop()


def test_sighup_moves_a_tenant_to_another_domain_in_every_worker(hup: _Hup) -> None:
    """After a reload routing the tenant to OpenBao, no worker signs with, lists or publishes
    its token key; the same name is then created in OpenBao, with another public key."""
    d, tenant, backends = hup
    key = f"{tenant}/k"
    made = _call(d, "POST", "/v1/keys", {"key": key})
    assert made.status == 201
    in_token = _call(d, "GET", f"/v1/kids/{tenant}.k.v1").json["jwk"]["x"]
    assert _sign(d, key).status == 200
    assert _published(d, tenant) == [f"{tenant}.k.v1"]
    _rewrite(d, backends=backends, tenants={tenant: {"backend": "bao"}})
    d.sighup()
    wait_until(lambda: d.log_text().count("signerd.domains_reloaded") == 2, 15, "two reloads")
    for _ in range(8):  # fresh connections: both workers answer
        reply = _sign(d, key)
        assert (reply.status, reply.code) == (404, "unknown_key")
        assert _published(d, tenant) == []
        assert _call(d, "GET", f"/v1/keys?tenant={tenant}").json["keys"] == []
        assert _call(d, "GET", f"/v1/kids/{tenant}.k.v1").status == 404
    remade = _call(d, "POST", "/v1/keys", {"key": key})
    assert remade.status == 201, remade.body
    assert _call(d, "GET", f"/v1/kids/{tenant}.k.v1").json["jwk"]["x"] != in_token
    wait_until(
        lambda: all(_sign(d, key).status == 200 for _ in range(6)), 15, "both workers signing"
    )
    assert _published(d, tenant) == [f"{tenant}.k.v1"]


def test_a_reload_that_changes_a_backend_or_the_nonce_store_is_refused_whole(
    hup: _Hup, tmp_path: Path
) -> None:
    """A file that moves the tenant, adds a trusted key and also adds a backend (or changes
    the nonce store) is refused: the map and the trusted keys stay as they were."""
    d, tenant, backends = hup
    key = f"{tenant}/k"
    assert _call(d, "POST", "/v1/keys", {"key": key}).status == 201
    jwk = _call(d, "GET", f"/v1/kids/{tenant}.k.v1").json["jwk"]
    (tmp_path / "peer.jwk").write_text(json.dumps(jwk))
    trusted = [{"tenant": tenant, "kid": jwk["kid"], "jwk_file": str(tmp_path / "peer.jwk")}]
    moved = {tenant: {"backend": "bao"}}
    extra = {**backends, "extra": backends["bao"]}
    refusals = [
        (
            {"backends": extra, "federation": {"trusted_keys": trusted}},
            "backends: a backend added, removed or changed needs a restart",
        ),
        (
            {
                "backends": backends,
                "federation": {"trusted_keys": trusted, "nonces": {"timeout": 3.0}},
            },
            "federation.nonces.timeout: cannot change on reload",
        ),
    ]
    for overrides, why in refusals:
        _rewrite(d, tenants=moved, **overrides)
        d.sighup()
        # the supervisor and both workers refuse it, for that reason
        line = f'signerd.reload_refused error="{why}'

        def refused(line: str = line) -> bool:
            return d.log_text().count(line) == 3

        wait_until(refused, 15, "three refusals")
        for _ in range(6):
            assert _sign(d, key).status == 200  # still in the token
            listed = _call(d, "GET", f"/v1/trusted-keys?tenant={tenant}")
            assert listed.status == 200 and jwk["kid"] not in listed.body.decode()
    assert "signerd.domains_reloaded" not in d.log_text()
    # the same trusted key without the restart-only change is taken, by every worker
    _rewrite(
        d,
        backends=backends,
        tenants={tenant: {"backend": "hsm"}},
        federation={"trusted_keys": trusted},
    )
    d.sighup()
    wait_until(lambda: d.log_text().count("signerd.domains_reloaded") == 2, 15, "two reloads")
    for _ in range(6):
        listed = _call(d, "GET", f"/v1/trusted-keys?tenant={tenant}")
        assert listed.status == 200 and jwk["kid"] in listed.body.decode()
