"""Signing domains: a tenant's keys live in its own backend only.

A key service over the session's SoftHSM token and a real OpenBao dev server,
with one tenant routed to each. A key planted in the wrong domain (made in the
token under the name of the tenant that OpenBao serves) is never listed,
published, looked up by kid, signed with or refreshed into the other domain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from signerd.backends import Backend
from signerd.backends.pkcs11 import from_config as pkcs11_backend
from signerd.backends.vault import from_config as vault_backend
from signerd.errors import UnknownKey, UnknownKid
from signerd.keys import KeyService, Settings
from signerd.wire import KeyName

from ..conftest import pkcs11_backend_config, unique

pytestmark = pytest.mark.timeout(120)


class _Domains:
    def __init__(self, svc: KeyService, hsm: Backend, vault: Backend, hsm_t: str, vault_t: str):
        self.svc, self.hsm, self.vault = svc, hsm, vault
        self.hsm_tenant, self.vault_tenant = hsm_t, vault_t


@pytest.fixture
async def domains(openbao_backend_config: dict[str, Any]) -> AsyncIterator[_Domains]:
    hsm_t, vault_t = unique("dh"), unique("dv")
    # the test's own handles on both stores, to plant keys behind the service's back
    hsm, vault = pkcs11_backend(pkcs11_backend_config()), vault_backend(openbao_backend_config)
    svc = KeyService(
        {
            "hsm": pkcs11_backend(pkcs11_backend_config()),
            "vault": vault_backend(openbao_backend_config),
        },
        default_backend="hsm",
        tenant_backends={hsm_t: "hsm", vault_t: "vault"},
        settings=Settings(refresh_interval=0, unknown_kid_refresh=0.0),
    )
    await svc.start()
    yield _Domains(svc, hsm, vault, hsm_t, vault_t)
    await svc.close()
    hsm.close()
    vault.close()


async def test_a_key_planted_in_another_domain_is_never_seen(domains: _Domains) -> None:
    """A key of the OpenBao tenant made in the token is not listed, published, looked up,
    signed with or refreshed in; creating that name makes it in OpenBao."""
    svc = domains.svc
    planted = KeyName(domains.vault_tenant, "k")
    await asyncio.to_thread(domains.hsm.create, planted)  # the wrong domain
    await svc.refresh_all()
    assert planted not in {i.key for i in await svc.list_keys()}
    assert await svc.list_keys(domains.vault_tenant) == []
    assert planted.kid(1) not in {v.kid for v in svc.published()}
    with pytest.raises(UnknownKid):
        await svc.lookup_kid(planted.kid(1))
    with pytest.raises(UnknownKid):
        await svc.verify(planted.kid(1), b"x", b"\0" * 64)
    with pytest.raises(UnknownKey):
        await svc.sign(planted, b"x")
    with pytest.raises(UnknownKey):
        await svc.describe(planted)
    assert await svc.read(planted) is None
    # the name is free in its own domain: created there, signed there
    info = await svc.create(planted)
    assert info.active is not None
    kid, signature = await svc.sign(planted, b"payload")
    assert kid == planted.kid(1)
    theirs = await asyncio.to_thread(domains.vault.describe, planted)
    assert theirs.active is not None and theirs.active.public_key == info.active.public_key
    ours = await asyncio.to_thread(domains.hsm.describe, planted)
    assert ours.active is not None and ours.active.public_key != info.active.public_key
    await svc.verify(kid, b"payload", signature)


async def test_each_tenant_lists_and_publishes_only_its_own_domain(domains: _Domains) -> None:
    """list_keys(tenant) and published(tenant) hold only that tenant's keys, each from
    its own backend."""
    svc = domains.svc
    a = KeyName(domains.hsm_tenant, "k")
    b = KeyName(domains.vault_tenant, "k")
    await svc.create(a)
    await svc.create(b)
    assert [i.key for i in await svc.list_keys(domains.hsm_tenant)] == [a]
    assert [i.key for i in await svc.list_keys(domains.vault_tenant)] == [b]
    assert [v.kid for v in svc.published(domains.hsm_tenant)] == [a.kid(1)]
    assert [v.kid for v in svc.published(domains.vault_tenant)] == [b.kid(1)]
    assert svc.backend_of(a)[0] == "hsm" and svc.backend_of(b)[0] == "vault"
    assert [i.key for i in await asyncio.to_thread(domains.vault.list_keys)].count(a) == 0
    assert b not in {i.key for i in await asyncio.to_thread(domains.hsm.list_keys)}


async def test_with_several_domains_no_backend_signs_on_the_loop(domains: _Domains) -> None:
    """With more than one backend every backend runs in its own executor (a hung token on
    the loop would stall every domain); with one, the token may sign on the loop."""
    assert domains.svc._calls.inline == frozenset()
    alone = KeyService({"hsm": pkcs11_backend(pkcs11_backend_config())}, default_backend="hsm")
    try:
        assert alone._calls.inline == frozenset({"hsm"})
    finally:
        await alone.close()
