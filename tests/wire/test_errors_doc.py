"""The closed error set is documented: docs/protocol.md's table and the OpenAPI enum match
signerd/errors.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from signerd.errors import CODES, SignerdError, error_for_code

ROOT = Path(__file__).resolve().parents[2]


def test_protocol_doc_tables_every_code_with_its_status() -> None:
    """Each code appears once in docs/protocol.md's error table with its status; no extra codes."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9_]+)` \| (\d{3}) \|", text, re.M)
    assert {code: int(status) for code, status in rows} == {
        c: cls.status for c, cls in CODES.items()
    }
    assert len(rows) == len(CODES)


def test_openapi_enumerates_every_code() -> None:
    """The OpenAPI Error schema lists exactly the codes."""
    doc = json.loads((ROOT / "signerd" / "openapi.json").read_text())
    enum = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"][
        "enum"
    ]
    assert sorted(enum) == sorted(CODES)


def test_wire_codes_map_back_to_their_class() -> None:
    """error_for_code gives the class of each code; an unknown code is internal_error."""
    for code, cls in CODES.items():
        err = error_for_code(code, "m", "rid")
        assert type(err) is cls and err.code == code and err.request_id == "rid"
    assert error_for_code("no_such_code").code == "internal_error"
    assert all(issubclass(c, SignerdError) for c in CODES.values())
