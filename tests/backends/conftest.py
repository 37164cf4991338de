"""Fixtures of the OpenBao backend tests: a dev server per module, and backends on it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from signerd.backends.vault import VaultBackend, from_config

from ..support.openbao import BaoServer, dev_server, vault_backend_config


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BaoServer]:
    """A dev server of the test module's own."""
    with dev_server(tmp_path_factory.mktemp("bao-dev")) as server:
        yield server


@pytest.fixture
def make(bao: BaoServer) -> Iterator[Any]:
    """Backends on the dev server (root token unless overridden); closed after the test."""
    made: list[VaultBackend] = []

    def make_backend(server: BaoServer | None = None, **overrides: Any) -> VaultBackend:
        backend = from_config(vault_backend_config(server or bao, **overrides))
        made.append(backend)
        return backend

    yield make_backend
    for backend in made:
        backend.close()
