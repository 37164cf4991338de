"""The ``/v1/whoami`` call: how signerd sees the caller (see ``signerd.client``)."""

from __future__ import annotations

from typing import Any

from ..errors import InternalError
from ._ops import Op


def _whoami(doc: Any, _rid: str | None = None) -> dict[str, Any]:
    if not isinstance(doc, dict) or not isinstance(doc.get("peer"), dict):
        raise InternalError("answer outside the protocol: field 'peer'")
    if not isinstance(doc.get("rules"), list):
        raise InternalError("answer outside the protocol: field 'rules'")
    return doc


def op_whoami() -> Op[dict[str, Any]]:
    return Op("GET", "/v1/whoami", None, _whoami, True)
