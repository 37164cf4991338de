"""The producer's local checks and the client's signing inputs against the stored federation vectors."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from signerd.client._federation import TelemetrySignature
from signerd.gateway import Producer, StaticKeys, canonical_data, feedback_signing_input
from signerd.wire._jwk import from_jwk
from signerd.wire._strict_json import loads_strict

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "federation.json").read_text("utf-8"))


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
