"""The producer's local checks and the client's signing inputs against the stored federation vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from signerd.client import TelemetrySignature
from signerd.errors import SignerdError
from signerd.gateway import Producer, StaticKeys, canonical_data, feedback_signing_input
from signerd.wire import from_jwk, loads_strict

from ..federation.test_vectors import raw_envelope

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "federation.json").read_text("utf-8"))
REFUSED: list[dict[str, Any]] = VECTORS["refused"]
#: what a parsed mapping can no longer show: the double's text, and which duplicate came first
_ONLY_IN_TEXT = {'{"a":0.10000000000000001}', '{"a":1,"a":2}'}


def _keys(kid: str) -> StaticKeys:
    return StaticKeys({"acme": [{**VECTORS["key"]["jwk"], "kid": kid}]})


def test_feedback_signing_input_matches_the_vector() -> None:
    """canonical_data and feedback_signing_input give the vector's exact bytes."""
    v = VECTORS["feedback"]
    data = loads_strict(v["data_text"].encode())
    assert canonical_data(data).decode() == v["canonical_data"]
    got = feedback_signing_input(
        v["tenant"], int(v["signed_at"]), v["nonce"], v["schema"], v["kid"], canonical_data(data)
    )
    assert got.hex() == v["signature_input_hex"]


async def test_producer_accepts_the_feedback_vector_as_sent() -> None:
    """The vector's envelope, with data exactly as its text, verifies locally by kid."""
    v = VECTORS["feedback"]
    fields = {k: v[k] for k in ("tenant", "signed_at", "nonce", "schema", "kid", "signature")}
    raw = json.dumps(fields)[:-1] + ', "data": ' + v["data_text"] + "}"
    clock = float(v["signed_at"])
    producer = Producer(None, "acme/telemetry", keys=_keys(v["kid"]), clock=lambda: clock)  # type: ignore[arg-type]
    got = await producer.verify_feedback(raw.encode(), schema=v["schema"])
    assert got.kid == v["kid"]


def test_telemetry_signing_input_matches_the_vector() -> None:
    """TelemetrySignature.signing_input gives the vector's exact bytes, and the signature verifies."""
    v = VECTORS["telemetry"]
    sig = TelemetrySignature(
        v["kid"], int(v["timestamp"]), v["nonce"], base64.b64decode(v["signature"])
    )
    message = sig.signing_input(base64.b64decode(v["body"]))
    assert message.hex() == v["signature_input_hex"]
    _, public = from_jwk({**VECTORS["key"]["jwk"], "kid": v["kid"]})
    public.verify(sig.signature, message)


def _producer() -> Producer:
    clock = float(VECTORS["feedback"]["signed_at"])
    kid = VECTORS["feedback"]["kid"]
    return Producer(None, "acme/telemetry", keys=_keys(kid), clock=lambda: clock)  # type: ignore[arg-type]


@pytest.mark.parametrize("v", REFUSED, ids=[v["data_text"] for v in REFUSED])
async def test_producer_refuses_every_refused_vector(v: dict[str, Any]) -> None:
    """The raw envelope of each refused data text, signed as a lax verifier would check it,
    is malformed_json to the producer, as it is to /v1/feedback/verify."""
    raw = raw_envelope(v["data_text"], v["lax_canonical_data"] or v["data_text"])
    with pytest.raises(SignerdError) as info:
        await _producer().verify_feedback(raw.encode(), schema=VECTORS["feedback"]["schema"])
    assert info.value.code == "malformed_json", v["why"]


@pytest.mark.parametrize(
    "v", [v for v in REFUSED if v["data_text"] not in _ONLY_IN_TEXT], ids=lambda v: v["data_text"]
)
async def test_producer_refuses_refused_values_in_a_parsed_envelope(v: dict[str, Any]) -> None:
    """An already-parsed envelope whose data still shows the refused value is malformed_json."""
    raw = raw_envelope(v["data_text"], v["lax_canonical_data"] or v["data_text"])
    with pytest.raises(SignerdError) as info:
        await _producer().verify_feedback(json.loads(raw), schema=VECTORS["feedback"]["schema"])
    assert info.value.code == "malformed_json", v["why"]


async def test_producer_accepts_the_builders_genuine_envelope() -> None:
    """The envelope builder the refusal tests use makes a genuine envelope the producer accepts."""
    f = VECTORS["feedback"]
    raw = raw_envelope(f["data_text"], f["canonical_data"])
    got = await _producer().verify_feedback(raw.encode(), schema=f["schema"])
    assert got.kid == f["kid"]
