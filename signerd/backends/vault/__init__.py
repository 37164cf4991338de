"""The Vault / OpenBao transit backend.

``parse_settings`` validates a ``[backends.NAME]`` table of type ``vault``
without contacting Vault; ``build`` makes the backend (it logs in at its first
call).
"""

from ._auth import AppRole, Auth, TokenFile
from ._backend import VaultBackend
from ._build import build, build_transport, from_config
from ._http import NotFoundInVault, Transport, translate
from ._settings import VaultSettings, parse_settings
from ._sign import SignClient

__all__ = [
    "AppRole",
    "Auth",
    "NotFoundInVault",
    "SignClient",
    "TokenFile",
    "Transport",
    "VaultBackend",
    "VaultSettings",
    "build",
    "build_transport",
    "from_config",
    "parse_settings",
    "translate",
]
