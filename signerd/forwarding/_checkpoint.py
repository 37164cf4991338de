"""Signed checkpoints of a chain's forwarded head, and the check of a trail against them.

A checkpoint says "on host H, chain C (worker W) had forwarded R records, the last
one seq N with hash X, in the file whose first record is seq F with hash G", at a
time, signed (Ed25519) with the configured checkpoint key through the backend that
holds it; its kid is in signerd's JWKS. It goes to the collector in the same stream
as the records (MSGID ``checkpoint``). Anyone with the JWKS can check a copy
offline: ``check_forwarded`` reads what the collector wrote, keeps the checkpoints
whose signature verifies (a bad one fails the check) and checks the local trail
against them as against anchors, so a trail rewritten with recomputed hashes and
rewritten local anchors is caught by the copy that left the host.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature

from .._files import bounded_lines, open_regular
from ..audit import Anchor
from ..wire import b64url, b64url_decode, from_jwk
from ._syslog import parse

__all__ = ["Checkpoint", "Signer", "jwks_keys", "read_checkpoints", "sign_checkpoint"]

#: signs a payload with the checkpoint key: (the kid that signed, the signature)
Signer = Callable[[bytes], tuple[str, bytes]]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_LINE = 64 << 10


@dataclass(frozen=True)
class Checkpoint:
    chain: str
    host: str
    worker: str
    seq: int
    head: str
    first_seq: int
    first_hash: str
    records: int
    time: float

    def fields(self, kid: str) -> dict[str, Any]:
        return {
            "v": 1,
            "checkpoint": self.chain,
            "host": self.host,
            "worker": self.worker,
            "seq": self.seq,
            "head": self.head,
            "first_seq": self.first_seq,
            "first_hash": self.first_hash,
            "records": self.records,
            "time": round(self.time, 6),
            "kid": kid,
        }

    def anchor(self) -> Anchor:
        """As an anchor of the chain, for the trail's own check."""
        return Anchor(
            self.chain, "schedule", self.time, self.seq, self.head, self.first_seq, self.first_hash
        )


def _payload(doc: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(doc), sort_keys=True, separators=(",", ":")).encode()


def sign_checkpoint(cp: Checkpoint, signer: Signer, kid_hint: str) -> bytes:
    """The checkpoint's JSON with ``sig``; the kid signed into it is the one that signed."""
    kid, signature = signer(_payload(cp.fields(kid_hint)))
    if kid != kid_hint:  # the key rotated meanwhile: sign again, naming the version that signs
        kid, signature = signer(_payload(cp.fields(kid)))
    doc = cp.fields(kid)
    doc["sig"] = b64url(signature)
    return _payload(doc)


def jwks_keys(doc: object) -> dict[str, Any]:
    """The Ed25519 public keys of a JWKS document by kid (keys that are not are skipped)."""
    found: dict[str, Any] = {}
    keys = doc.get("keys") if isinstance(doc, dict) else None
    for jwk in keys if isinstance(keys, list) else []:
        try:
            kid, key = from_jwk(jwk) if isinstance(jwk, dict) else ("", None)
        except ValueError:
            continue
        if kid and key is not None:
            found[kid] = key
    return found


def _parse(msg: bytes) -> tuple[Checkpoint, str, bytes, bytes] | None:
    try:
        doc = json.loads(msg)
    except ValueError:
        return None
    if not isinstance(doc, dict) or doc.get("v") != 1:
        return None
    ints = [doc.get(k) for k in ("seq", "first_seq", "records")]
    texts = [doc.get(k) for k in ("checkpoint", "host", "worker", "kid", "sig")]
    when = doc.get("time")
    if any(type(v) is not int or v < 0 for v in ints) or not all(isinstance(t, str) for t in texts):
        return None
    if isinstance(when, bool) or not isinstance(when, int | float):
        return None
    if not all(
        isinstance(doc.get(k), str) and _HEX64.fullmatch(doc[k]) for k in ("head", "first_hash")
    ):
        return None
    sig = str(doc.pop("sig"))
    try:
        signature = b64url_decode(sig)
    except ValueError:
        return None
    cp = Checkpoint(
        str(doc["checkpoint"]),
        str(doc["host"]),
        str(doc["worker"]),
        int(doc["seq"]),
        str(doc["head"]),
        int(doc["first_seq"]),
        str(doc["first_hash"]),
        int(doc["records"]),
        float(when),
    )
    return cp, str(doc["kid"]), signature, _payload(doc)


def read_checkpoints(
    path: str, keys: Mapping[str, Any], host: str | None = None
) -> tuple[list[Checkpoint], list[str]]:
    """The checkpoints in a file a collector wrote (one RFC 5424 message a line), those of
    ``host`` only when given, each checked against ``keys`` (``jwks_keys``); and problems:
    a checkpoint whose kid is unknown or whose signature does not verify."""
    found: list[Checkpoint] = []
    problems: list[str] = []
    lineno, whole = 0, True
    with open_regular(path) as handle:
        for part in bounded_lines(handle, _MAX_LINE + 1):
            line_whole, whole = whole, part.endswith(b"\n")
            if not line_whole:
                continue
            lineno += 1
            message = parse(part) if len(part) <= _MAX_LINE else None
            if message is None or message.msgid != "checkpoint":
                continue
            parsed = _parse(message.msg)
            if parsed is None:
                problems.append(f"{path} line {lineno}: a checkpoint that cannot be read")
                continue
            cp, kid, signature, payload = parsed
            if host is not None and cp.host != host:
                continue
            key = keys.get(kid)
            if key is None:
                problems.append(
                    f"{path} line {lineno}: checkpoint signed by {kid[:80]!r}, not in the JWKS"
                )
                continue
            try:
                key.verify(signature, payload)
            except InvalidSignature:
                problems.append(f"{path} line {lineno}: checkpoint signature does not verify")
                continue
            found.append(cp)
    return found, problems


def anchors_of(checkpoints: Sequence[Checkpoint]) -> list[Anchor]:
    return [cp.anchor() for cp in checkpoints]
