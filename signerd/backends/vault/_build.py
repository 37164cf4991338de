"""Making a ``VaultBackend``: its nodes, its hvac clients (which follow the node
in use) and its token."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import hvac
import hvac.adapters

from ._auth import Auth
from ._backend import VaultBackend
from ._http import Transport
from ._nodes import Nodes
from ._settings import VaultSettings, parse_settings


def _following(nodes: Nodes) -> type[Any]:
    """An hvac adapter that sends to whichever node of the cluster is in use."""

    class Following(hvac.adapters.JSONAdapter):  # type: ignore[misc]
        @property
        def base_uri(self) -> str:
            return nodes.current

        @base_uri.setter
        def base_uri(self, value: str) -> None:
            pass  # set by hvac's constructor; the node in use decides

    return Following


def build_transport(settings: VaultSettings) -> Transport[Auth]:
    nodes = Nodes(
        settings.nodes, ca_file=settings.ca_file, health_interval=settings.health_interval
    )

    def make() -> Any:
        client = hvac.Client(
            url=nodes.current,
            namespace=settings.namespace,
            verify=settings.ca_file or True,
            timeout=settings.timeout,
            adapter=_following(nodes),
        )
        # Vault is reached directly: no proxy or CA bundle from the environment
        # (and no scan of os.environ on every request, a quarter of a sign's cost)
        client.adapter.session.trust_env = False
        return client

    return Transport(make, Auth(settings.source, make), nodes)


def build(settings: VaultSettings) -> VaultBackend:
    """The backend for a parsed table (Vault is contacted at the first call)."""
    return VaultBackend(settings, build_transport(settings))


def from_config(cfg: Mapping[str, Any]) -> VaultBackend:
    """A backend from its configuration table (keys: see ``parse_settings``)."""
    return build(parse_settings(cfg))
