"""A version's key pair on the token: generated, and its private half's attributes read back."""

from __future__ import annotations

import logging
from typing import Any

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from ...wire import KeyName
from ._objects import ED25519_OID, raw_public_key

log = logging.getLogger("signerd.pkcs11")


def generate_pair(session: Any, key: KeyName, version: int) -> tuple[int, bytes]:
    """Generate the key pair for ``version`` (or the next free one): its number and raw
    public key. The private half is sensitive and never extractable."""
    while any(True for _ in session.get_objects({Attribute.LABEL: key.kid(version)})):
        # Left over from an interrupted rotation: that kid is burnt, never reused.
        log.warning("signerd.pkcs11.skip_orphan kid=%s", key.kid(version))
        version += 1
    pub = make_pair(ed25519_parameters(session), key.kid(version))
    return version, raw_public_key(pub[Attribute.EC_POINT])


def ed25519_parameters(session: Any) -> Any:
    """The token's Ed25519 domain parameters, to make key pairs with."""
    return session.create_domain_parameters(
        KeyType.EC_EDWARDS,
        {Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
        local=True,
    )


def make_pair(params: Any, kid: str) -> Any:
    """A key pair labelled (and identified) by ``kid``, kept on the token; its public half.
    The private half signs, is sensitive and never extractable."""
    pub, _ = params.generate_keypair(
        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
        store=True,
        label=kid,
        id=kid.encode(),
        public_template={Attribute.VERIFY: True, Attribute.PRIVATE: False},
        private_template={
            Attribute.SIGN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        },
    )
    return pub


def key_attributes(session: Any, kid: str) -> dict[str, Any]:
    """The security attributes of a version's private key, read back from the token."""
    attrs = (
        Attribute.TOKEN,
        Attribute.PRIVATE,
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.KEY_TYPE,
        Attribute.LOCAL,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
    )
    obj = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=kid)
    return {a.name: obj[a] for a in attrs}
