"""docs/federation.md's statements, checked against the code and the test vectors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd._config import load
from signerd.errors import MalformedJson
from signerd.gateway import STATUS_FOR_CODE, ServicePins, TelemetryHeaders
from signerd.wire import canonical_data, parse_json
from signerd.wire._envelopes import attestation_of_body

from ..conftest import ROOT, daemon_config, to_toml
from ..gateway.test_producer import _code, _keys, envelope, producer

DOC = (ROOT / "docs" / "federation.md").read_text()
VECTORS = json.loads((ROOT / "tests" / "vectors" / "federation.json").read_text())
ATT = "sha256:" + "0123456789abcdef" * 4


def _printed(section_start: str) -> tuple[str, str]:
    """The ``input =`` and ``signature =`` lines printed after ``section_start``."""
    rest = DOC[DOC.index(section_start) :]
    found = re.search(r"^    input     = (.*)\n    signature = (.*)$", rest, re.M)
    assert found, section_start
    return found.group(1), found.group(2)


@pytest.mark.parametrize(
    ("flow", "start"), [("telemetry", "Telemetry (tenant"), ("feedback", "Feedback (the input")]
)
def test_printed_vectors_are_ascii_and_decode_to_the_signed_bytes(flow: str, start: str) -> None:
    """The doc prints each vector input in ASCII; unescaped, it is the exact signed bytes."""
    text, signature = _printed(start)
    assert text.isascii(), "non-ASCII in a printed vector: print it as an escape"
    decoded = re.sub(
        r"\\u([0-9a-f]{4})|\\U([0-9a-f]{8})", lambda m: chr(int(m[1] or m[2], 16)), text
    )
    vector = VECTORS[flow]
    assert decoded.encode("utf-8") == bytes.fromhex(vector["signature_input_hex"])
    assert signature == vector["signature"]


@pytest.mark.parametrize(
    ("text", "accepted"),
    [
        ("9007199254740991", True),  # 2^53 - 1
        ("-9007199254740991", True),
        ("9007199254740992", False),  # beyond the safe range, in every spelling below
        ("9007199254740992.0", False),
        ("1e16", False),
        ("1e21", False),
        ("1E+21", False),
        ("1000000000000000000000", False),  # 1e21 in 22 digits
        ("1.5e300", False),
        ("1e400", False),
        ("0.10000000000000001", False),
        ("1e-400", False),
        ("1E2", True),
        ("1e+2", True),
        ("100.0", True),
    ],
)
def test_number_rules_as_documented(text: str, accepted: bool) -> None:
    """Each number the doc names gets the doc's verdict, bare and nested, whatever its spelling."""
    assert f"`{text}`" in DOC or text.startswith("-") or text == "9007199254740991"
    for doc in (f'{{"n":{text}}}', f'{{"a":[{{"b":{text}}}]}}'):
        if accepted:
            parse_json(doc.encode(), max_bytes=1024, max_depth=4)
        else:
            with pytest.raises(MalformedJson):
                parse_json(doc.encode(), max_bytes=1024, max_depth=4)


def test_number_spellings_canonicalise_as_documented() -> None:
    """1E2, 1e+2 and 100.0 canonicalise (RFC 8785) to 100, and 1.5E-7 to 1.5e-7, as the doc says."""
    assert canonical_data(parse_json(b"[1E2,1e+2,100.0,1.5E-7]", max_bytes=64, max_depth=2)) == (
        b"[100,100,100,1.5e-7]"
    )
    assert "`1E2` becomes `100`" in DOC and "`1.5E-7` becomes `1.5e-7`" in DOC
    assert "**A number is judged by its value, never by how it is written.**" in DOC


def test_attestation_parses_the_telemetry_body_strictly() -> None:
    """With attestation asked, a body the strict rules refuse carries no attestation (403)."""
    good = json.dumps({"attestation_measurement_hash": ATT, "n": 1}).encode()
    assert attestation_of_body(good, max_depth=32) == ATT
    duplicate = b'{"attestation_measurement_hash":"' + ATT.encode() + b'","n":1,"n":2}'
    unsafe = b'{"attestation_measurement_hash":"' + ATT.encode() + b'","n":1e16}'
    large = b'{"attestation_measurement_hash":"' + ATT.encode() + b'","n":[{"m":1E+21}]}'
    for body in (duplicate, unsafe, large):
        assert attestation_of_body(body, max_depth=32) is None
    assert "is answered 403 `attestation_mismatch`" in " ".join(DOC.split())


def _fresh(private: Ed25519PrivateKey, nonce: str) -> dict[str, Any]:
    return envelope(private, nonce=nonce, signed_as={"nonce": nonce})


async def test_skew_boundary_is_inclusive() -> None:
    """A timestamp exactly skew seconds off is accepted; a moment more is stale_timestamp."""
    private, keys = _keys()
    now = float(int(envelope(private)["signed_at"]))
    assert await producer(keys, now + 300).verify_feedback(envelope(private), schema="ingest.v1")
    assert await producer(keys, now - 300).verify_feedback(
        _fresh(private, "BBECAwQFBgcICQoLDA0ODw"), schema="ingest.v1"
    )
    late = producer(keys, now + 300.001)
    assert await _code(late, _fresh(private, "CCECAwQFBgcICQoLDA0ODw")) == ("stale_timestamp")
    assert "`|now \u2212 timestamp| \u2264 skew`" in DOC


def test_relative_jwk_file_is_relative_to_the_configuration_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative jwk_file resolves against the configuration file's directory, not the cwd."""
    (tmp_path / "etc" / "peers").mkdir(parents=True)
    jwk = VECTORS["key"]["jwk"]
    (tmp_path / "etc" / "peers" / "p.jwk").write_text(json.dumps(jwk))
    doc = daemon_config(
        tmp_path,
        federation={"trusted_keys": [{"tenant": "acme", "kid": "p-1", "jwk_file": "peers/p.jwk"}]},
    )
    (tmp_path / "etc" / "signerd.toml").write_text(to_toml(doc))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load(str(tmp_path / "etc" / "signerd.toml"))
    assert [p.kid for p in config.federation.trusted] == ["p-1"]
    assert "relative to the directory of the\n  configuration file" in DOC


def test_gateway_contract_tables_match_the_library() -> None:
    """The gateway's header table and status table are those of signerd.gateway."""
    rows = dict(re.findall(r"^\| `(X-[A-Za-z-]+)` \| (.+) \|$", DOC, re.M))
    names = TelemetryHeaders()
    expected = {
        ServicePins.from_mapping({}).header,
        names.tenant,
        names.kid,
        names.timestamp,
        names.nonce,
        names.signature,
    }
    assert set(rows) == expected
    statuses: dict[str, int] = {}
    for cell, status in re.findall(r"^\| (.+) \| (\d{3})(?::[^|]*)? \|$", DOC, re.M):
        for code in re.findall(r"`([a-z0-9_]+)`", cell):
            statuses[code] = int(status)
    for code, status in STATUS_FOR_CODE.items():
        assert statuses.get(code) == status, code
    assert statuses["invalid_client_certificate"] == 401
