"""Load that records acknowledged answers, and the checks run on a daemon after a crash.

``load`` runs in client processes: signers sign random payloads and an admin caller rotates,
promotes, retires and destroys versions, each writing one JSON line per acknowledged answer
(``{"op": "sign", "kid", "data", "sig"}`` or ``{"op": "listing", "key", "versions"}``) to its
own file. ``Ledger`` keeps every acknowledged answer across crashes; ``check_restart`` holds a
restarted daemon to it (see tests/reliability/test_crash.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from signerd.audit import load_key, payload_hmac, verify_trail
from signerd.client import Client, KeyDescription
from signerd.errors import SignerdError
from signerd.testing import SoftHSMToken

__all__ = ["Ledger", "check_restart", "run_load", "token_objects"]

_SIGNED_STATES = ("active", "verify-only", "pending")  # a verify of their kid succeeds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _thumbprint(x: str) -> str:
    """RFC 7638 thumbprint of an Ed25519 JWK with public part ``x``."""
    member = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": x}, separators=(",", ":"))
    return _b64(hashlib.sha256(member.encode()).digest())


def _versions(d: KeyDescription) -> list[dict[str, Any]]:
    return [
        {"version": v.version, "kid": v.kid, "state": str(v.state), "thumbprint": v.thumbprint}
        for v in d.versions
    ]


def _signer(socket: str, keys: list[str], seed: int, until: float, out: str) -> None:
    rng, client = random.Random(seed), Client(socket, timeout=5.0)
    with open(out, "a", buffering=1) as f:
        while time.time() < until:
            key, data = rng.choice(keys), rng.randbytes(24)
            try:
                s = client.sign(key, data)
            except SignerdError:
                continue
            except Exception:  # the daemon's connection broke: that is the point
                time.sleep(0.02)
                continue
            line = {"op": "sign", "key": key, "kid": s.kid, "data": _b64(data)}
            f.write(json.dumps({**line, "sig": _b64(s.signature)}) + "\n")


def _admin(socket: str, keys: list[str], seed: int, until: float, out: str) -> None:
    rng, client = random.Random(seed), Client(socket, timeout=5.0)
    with open(out, "a", buffering=1) as f:
        while time.time() < until:
            key = rng.choice(keys)
            try:
                d = client.get_key(key)
                by_state: dict[str, list[int]] = {}
                for v in d.versions:
                    by_state.setdefault(str(v.state), []).append(v.version)
                what = rng.random()
                if what < 0.45:
                    _, d = client.rotate(key, pending=rng.random() < 0.3)
                elif what < 0.6 and by_state.get("pending"):
                    d = client.promote(key, rng.choice(by_state["pending"]))
                elif what < 0.8 and by_state.get("verify-only"):
                    d = client.retire(key, min(by_state["verify-only"]))
                elif by_state.get("retired"):
                    n = min(by_state["retired"])
                    d = client.destroy(key, n, next(v.kid for v in d.versions if v.version == n))
            except SignerdError:
                continue
            except Exception:
                time.sleep(0.02)
                continue
            f.write(json.dumps({"op": "listing", "key": key, "versions": _versions(d)}) + "\n")


@contextmanager
def run_load(
    socket: str, keys: list[str], out: Path, seed: int, seconds: float, signers: int = 2
) -> Iterator[float]:
    """Signers and one admin caller for ``seconds``; yields the wall time the load ends at and
    waits for the callers on leaving."""
    ctx = multiprocessing.get_context("fork")
    until = time.time() + seconds
    procs = [
        ctx.Process(target=_signer, args=(socket, keys, seed * 100 + i, until, f"{out}.s{i}"))
        for i in range(signers)
    ]
    procs.append(
        ctx.Process(target=_admin, args=(socket, keys, seed * 100 + 99, until, f"{out}.a"))
    )
    for p in procs:
        p.start()
    try:
        yield until
    finally:
        for p in procs:
            p.join(timeout=seconds + 30)
            if p.is_alive():
                p.kill()
                p.join()


@dataclass
class Ledger:
    """Every answer callers got, across all crashes: signatures and the versions they saw."""

    signed: list[dict[str, Any]] = field(default_factory=list)
    thumbprints: dict[str, str] = field(default_factory=dict)  # kid -> thumbprint first seen
    highest: dict[str, int] = field(default_factory=dict)  # key -> highest version seen
    seen: dict[str, set[int]] = field(default_factory=dict)  # key -> versions seen
    taken: set[tuple[str, int]] = field(default_factory=set)  # ledger files' lines read
    checked: int = 0  # signatures whose record and verification were checked
    recorded: set[tuple[str, str]] = field(default_factory=set)  # the trail's (kid, hmac)
    offsets: dict[str, int] = field(default_factory=dict)  # trail files read up to
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def note_listing(self, key: str, versions: list[dict[str, Any]]) -> None:
        for v in versions:
            kid, tp = str(v["kid"]), v.get("thumbprint")
            if tp is not None:
                first = self.thumbprints.setdefault(kid, str(tp))
                assert first == tp, f"kid {kid} answered with two public keys ({first}, {tp})"
            self.seen.setdefault(key, set()).add(int(v["version"]))
            self.highest[key] = max(self.highest.get(key, 0), int(v["version"]))

    def read(self, out: Path) -> int:
        """Take in the answers the load's files hold beyond those already read."""
        got = 0
        for path in sorted(out.parent.glob(out.name + ".*")):
            for n, line in enumerate(path.read_text().splitlines()):
                if (str(path), n) in self.taken or not line.endswith("}"):
                    continue
                self.taken.add((str(path), n))
                doc = json.loads(line)
                got += 1
                if doc["op"] == "sign":
                    self.signed.append(doc)
                    version = int(doc["kid"].rsplit(".v", 1)[1])
                    self.seen.setdefault(doc["key"], set()).add(version)
                    self.highest[doc["key"]] = max(self.highest.get(doc["key"], 0), version)
                else:
                    self.note_listing(doc["key"], doc["versions"])
        return got


def _sign_records(ledger: Ledger, audit_dir: Path) -> None:
    """Take in (kid, payload_hmac) of the sign intent and ok records appended to the trail's
    files since the last call (the chain check, run on the whole trail each time, is what
    proves nothing before was changed)."""
    for path in sorted(audit_dir.glob("audit*.jsonl")):
        with open(path, "rb") as f:
            f.seek(ledger.offsets.get(str(path), 0))
            chunk = f.read()
        whole = chunk[: chunk.rfind(b"\n") + 1]
        ledger.offsets[str(path)] = ledger.offsets.get(str(path), 0) + len(whole)
        for raw in whole.splitlines():
            try:
                rec = json.loads(raw)
            except ValueError:
                continue  # a torn line: the chain check judges it
            if rec.get("operation") == "sign" and rec.get("outcome") in ("intent", "ok"):
                for h in rec.get("payload_hmac") or ():
                    ledger.recorded.add((str(rec.get("kid")), str(h)))


def _unfinished(audit_dir: Path) -> list[str]:
    """The live audit files whose last line is unfinished: a write in progress, or one the
    kill cut short, which that worker's next record accounts for (its ``discarded``)."""
    out = []
    for path in sorted(audit_dir.glob("audit*.jsonl")):
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() > 0:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    out.append(path.name)
    return out


def _until_every_file_ends_whole(socket: str, audit_dir: Path, tenant: str) -> None:
    """Read the JWKS on fresh connections (each lands on either worker, whose record follows
    within 50 ms) until every live file ends with a whole record twice in a row, so that
    the trail is judged once each worker has written after the restart, not in between."""
    deadline, whole = time.monotonic() + 20.0, 0
    while whole < 2:
        unfinished = _unfinished(audit_dir)
        assert time.monotonic() < deadline, f"audit files still unfinished: {unfinished}"
        if unfinished:
            whole = 0
            with Client(socket, timeout=10.0) as fresh:
                fresh.jwks(tenant)
        else:
            whole += 1
        time.sleep(0.15)


def check_restart(c: Client, keys: list[str], ledger: Ledger, audit_dir: Path) -> dict[str, int]:
    """Hold a restarted daemon to every answer given before; AssertionError says what broke.
    Returns counts of what was checked."""
    public: dict[str, Ed25519PublicKey] = {}
    for key in keys:
        versions = _versions(c.get_key(key))
        active = [v for v in versions if v["state"] == "active"]
        assert len(active) == 1, f"{key}: {len(active)} active versions: {versions}"
        lost = ledger.seen.get(key, set()) - {int(v["version"]) for v in versions}
        assert not lost, f"{key}: versions answered before the crash are gone: {sorted(lost)}"
        ledger.note_listing(key, versions)  # a kid answered with another public key fails here
        # published: exactly the versions that verify, each with the public key it lists
        jwks = {str(j["kid"]): str(j["x"]) for j in c.jwks(key.split("/")[0])}
        listed = {str(v["kid"]): v["thumbprint"] for v in versions if v["state"] in _SIGNED_STATES}
        assert set(jwks) == set(listed), f"{key}: JWKS {sorted(jwks)}, listing {sorted(listed)}"
        for kid, x in jwks.items():
            assert _thumbprint(x) == listed[kid], f"{kid}: the JWKS key is not the listed one"
            public[kid] = Ed25519PublicKey.from_public_bytes(_unb64(x))
        # the active version signs, under its own kid, with the key it publishes
        s = c.sign(key, b"after the crash")
        assert s.kid == active[0]["kid"], f"{key}: signed by {s.kid}, active {active[0]['kid']}"
        public[s.kid].verify(s.signature, b"after the crash")
        # a rotation now makes a version above every one ever answered
        kid, after = c.rotate(key, pending=True)
        version = int(kid.rsplit(".v", 1)[1])
        assert version > ledger.highest.get(key, 0), f"{key}: {kid} is not above the versions seen"
        ledger.note_listing(key, _versions(after))
    states = {v.kid: str(v.state) for key in keys for v in c.get_key(key).versions}
    hmac_key = load_key(str(audit_dir / "audit.key"))
    _sign_records(ledger, audit_dir)
    # each signature once: its record, and that it verifies (the kid's public key is held to
    # the first one seen on every later round, so it verifies as long as its kid does)
    for done in ledger.signed[ledger.checked :]:
        data, sig, kid = _unb64(done["data"]), _unb64(done["sig"]), done["kid"]
        mac = payload_hmac(hmac_key, hashlib.sha256(data).hexdigest())
        assert (kid, mac) in ledger.recorded, f"a signature by {kid} has no record in the trail"
        if states[kid] in _SIGNED_STATES:
            public[kid].verify(sig, data)  # InvalidSignature fails the test
    ledger.checked = len(ledger.signed)
    # the daemon agrees, on the newest and on some older ones: verifies, or refuses a retired kid
    sample = ledger.signed[-8:] + ledger.rng.sample(ledger.signed, min(8, len(ledger.signed)))
    for done in sample:
        args = (done["kid"], _unb64(done["data"]), _unb64(done["sig"]))
        if states[done["kid"]] in _SIGNED_STATES:
            assert c.verify(*args).kid == done["kid"]
        else:
            with pytest.raises(SignerdError):
                c.verify(*args)
    _until_every_file_ends_whole(c.socket_path, audit_dir, keys[0].split("/")[0])
    report, _ = verify_trail([str(audit_dir)])
    assert report.ok, f"audit trail: {report}"
    unpaired = 0  # intents whose outcome the crash cut off: "a signature may have been made"
    for note in report.notes:
        more = re.match(r"(\d+) more intent record", note)
        unpaired += int(more.group(1)) if more else int("has no outcome record" in note)
    return {"signatures": len(ledger.signed), "unpaired": unpaired}


_TOKEN_SCRIPT = """
import json, sys, pkcs11
from pkcs11 import Attribute, ObjectClass
lib = pkcs11.lib(sys.argv[1])
token = lib.get_token(token_label=sys.argv[2])
with token.open(user_pin=open(sys.argv[3]).read().strip()) as s:
    found = {
        kind: sorted(str(o[Attribute.LABEL]) for o in s.get_objects({Attribute.CLASS: cls}))
        for kind, cls in (("private", ObjectClass.PRIVATE_KEY), ("public", ObjectClass.PUBLIC_KEY))
    }
print(json.dumps(found))
"""


def token_objects(token: SoftHSMToken) -> dict[str, list[str]]:
    """The labels of the private and public keys on ``token``, read by a process of its own
    (SoftHSM reads SOFTHSM2_CONF once per process)."""
    args = [token.module, token.label, str(token.pin_file)]
    done = subprocess.run(
        [sys.executable, "-c", _TOKEN_SCRIPT, *args],
        env=token.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found: dict[str, list[str]] = json.loads(done.stdout)
    return found
