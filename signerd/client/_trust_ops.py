"""The trusted-key calls (``/v1/trusted-keys``; see ``signerd.client``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnknownKid
from ..wire import PEER_KID_RE
from ._fields import _field, _jwk
from ._ops import Op, _tenant
from ._results import TrustedKey


def op_trust_add(tenant: str, kid: str, jwk: Mapping[str, str]) -> Op[TrustedKey]:
    body = {"tenant": _tenant(tenant), "kid": kid, "jwk": dict(jwk)}
    return Op("POST", "/v1/trusted-keys", body, _trusted_key, False, admin=True)


def op_trust_list(tenant: str | None) -> Op[list[TrustedKey]]:
    query = "" if tenant is None else f"?tenant={_tenant(tenant)}"
    return Op("GET", "/v1/trusted-keys" + query, None, _trusted_keys, True)


def op_trust_retire(tenant: str, kid: str) -> Op[TrustedKey]:
    if not PEER_KID_RE.fullmatch(kid) or kid in {".", ".."}:
        raise UnknownKid()
    path = f"/v1/trusted-keys/{_tenant(tenant)}/{kid}/retire"
    return Op("POST", path, {}, _trusted_key, False, admin=True)


def _trusted_key(doc: Any, _rid: str | None = None) -> TrustedKey:
    jwk = _jwk(doc)
    return TrustedKey(
        tenant=_field(doc, "tenant", str),
        kid=_field(doc, "kid", str),
        state=_field(doc, "state", str),
        source=_field(doc, "source", str),
        jwk=jwk,
    )


def _trusted_keys(doc: Any, _rid: str | None = None) -> list[TrustedKey]:
    return [_trusted_key(item) for item in _field(doc, "keys", list)]
