"""The PKCS#11 backend: Ed25519 keys generated and kept on a token (SoftHSM2 in tests).

``parse_settings`` validates a ``[backends.NAME]`` table of type ``pkcs11``
without opening the library; ``build`` makes the backend. The on-token layout
(``APPLICATION``, ``KeyMeta``, ``meta_label``) is exported for tools that
write a keyring straight onto a token; ``purge_invalid`` is the offline repair
behind ``signerctl keys purge-invalid``.
"""

from ._backend import Pkcs11Backend, build, from_config
from ._objects import (
    APPLICATION,
    ED25519_OID,
    KeyMeta,
    key_of_label,
    label_digest,
    meta_label,
    raw_public_key,
)
from ._purge import Removed, purge_invalid
from ._settings import TokenConfig, parse_settings, parse_uri

__all__ = [
    "APPLICATION",
    "ED25519_OID",
    "KeyMeta",
    "Pkcs11Backend",
    "Removed",
    "TokenConfig",
    "build",
    "from_config",
    "key_of_label",
    "label_digest",
    "meta_label",
    "parse_settings",
    "parse_uri",
    "purge_invalid",
    "raw_public_key",
]
