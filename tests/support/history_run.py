"""A random concurrent workload on signerd, recorded as a history (tests/support/history.py).

``run`` starts ``processes`` client processes for ``seconds``; each picks, at random, one of
the daemons' sockets and one operation on one of the keys: sign, verify (sometimes of a
tampered message), list, rotate (active or pending), promote, retire, destroy, telemetry and
feedback sign and verify (sometimes replaying an accepted nonce), and kid lookups. Each
process writes its own history file; at the end every kid's public key is recorded.
"""

from __future__ import annotations

import base64
import multiprocessing
import random
import time
from pathlib import Path
from typing import Any

from signerd.client import Client
from signerd.errors import SignerdError

from .history import Recorder, snapshot

__all__ = ["WEIGHTS", "run"]

WEIGHTS = {
    "sign": 30,
    "verify": 12,
    "get": 8,
    "tsign": 8,
    "tverify": 8,
    "fsign": 5,
    "fverify": 5,
    "rotate": 5,
    "promote": 5,
    "retire": 5,
    "destroy": 4,
    "kid": 5,
}
SCHEMA = "history.v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _Worker:
    def __init__(self, sockets: list[str], keys: list[str], rec: Recorder, seed: int) -> None:
        self.clients = [Client(s, timeout=30.0) for s in sockets]
        self.keys = keys
        self.rec = rec
        self.rng = random.Random(seed)
        self.signed: list[tuple[str, bytes, bytes]] = []  # kid, data, signature
        self.envelopes: list[tuple[str, dict[str, Any]]] = []  # "t" or "f", what to verify
        self.accepted: list[tuple[str, dict[str, Any]]] = []
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.daemon = 0  # which daemon the current operation goes to

    def call(self, f: str, args: dict[str, Any], fn: Any) -> Any:
        op_id = self.rec.invoke(f, daemon=self.daemon, **args)
        try:
            value, result = fn()
        except SignerdError as e:
            self.rec.fail(op_id, e.code)
            return None
        except Exception as e:  # a transport failure is part of the history too
            self.rec.fail(op_id, f"transport:{type(e).__name__}")
            return None
        self.rec.ok(op_id, **value)
        return result

    def listing(self, key: str, description: Any) -> dict[str, Any]:
        self.versions[key] = snapshot(description)
        return {"versions": self.versions[key]}

    def pick_version(
        self, key: str, states: tuple[str, ...], oldest: bool = False
    ) -> dict[str, Any] | None:
        """A version last seen in one of ``states``: at random, or the oldest."""
        found = [v for v in self.versions.get(key, []) if v["state"] in states]
        if not found:
            return None
        return found[0] if oldest else self.rng.choice(found)

    def step(self) -> None:
        rng, key = self.rng, self.rng.choice(self.keys)
        self.daemon = rng.randrange(len(self.clients))
        c = self.clients[self.daemon]
        f = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        if f == "sign":
            data = rng.randbytes(16)

            def sign() -> Any:
                s = c.sign(key, data)
                return {"kid": s.kid, "sig": _b64(s.signature)}, s

            s = self.call("sign", {"key": key, "data": _b64(data)}, sign)
            if s is not None:
                self.signed = [*self.signed[-50:], (s.kid, data, s.signature)]
        elif f == "verify" and self.signed:
            kid, data, sig = rng.choice(self.signed)
            genuine = rng.random() < 0.8
            message = data if genuine else data + b"x"
            args = {"kid": kid, "data": _b64(message), "sig": _b64(sig), "genuine": genuine}
            self.call(
                "verify", args, lambda: ({"state": str(c.verify(kid, message, sig).state)}, None)
            )
        elif f == "get":
            self.call("get", {"key": key}, lambda: (self.listing(key, c.get_key(key)), None))
        elif f == "rotate":
            pending = rng.random() < 0.5

            def rotate() -> Any:
                kid, d = c.rotate(key, pending)
                return {"kid": kid, **self.listing(key, d)}, None

            self.call("rotate", {"key": key, "pending": pending}, rotate)
        elif f in ("promote", "retire", "destroy"):
            wanted = {
                "promote": ("pending",),
                "retire": ("pending", "verify-only"),
                "destroy": ("retired",),
            }[f]
            v = self.pick_version(key, wanted, oldest=f == "destroy")
            if v is None:
                return
            number, kid = int(v["version"]), str(v["kid"])

            def change() -> Any:
                if f == "promote":
                    d = c.promote(key, number)
                elif f == "retire":
                    d = c.retire(key, number)
                else:
                    d = c.destroy(key, number, kid, now=True)
                return self.listing(key, d), None

            self.call(f, {"key": key, "version": number}, change)
        elif f == "kid":
            v = self.pick_version(key, ("pending", "active", "verify-only", "retired", "destroyed"))
            if v is not None:
                self.pubkey(c, v["kid"])
        elif f == "tsign":
            body = b'{"n":%d}' % rng.randrange(1 << 30)

            def tsign() -> Any:
                t = c.telemetry_sign(key, body)
                value = {
                    "kid": t.kid,
                    "timestamp": t.timestamp,
                    "nonce": t.nonce,
                    "sig": _b64(t.signature),
                }
                return value, value

            t = self.call("tsign", {"key": key, "body": _b64(body)}, tsign)
            if t is not None:
                self.envelopes.append(("t", {**t, "body": body, "tenant": key.split("/")[0]}))
        elif f == "fsign":
            doc = {"n": rng.randrange(1 << 30), "s": "é\u2028", "x": [1.5, True, None]}

            def fsign() -> Any:
                e = c.feedback_sign(key, SCHEMA, doc)
                return {"envelope": e.to_json()}, e.to_json()

            e = self.call("fsign", {"key": key, "schema": SCHEMA, "data": doc}, fsign)
            if e is not None:
                self.envelopes.append(("f", e))
        elif f in ("tverify", "fverify"):
            self.verify_envelope(c, f[0])

    def verify_envelope(self, c: Client, kind: str) -> None:
        replay = bool(self.accepted) and self.rng.random() < 0.2
        pool = self.accepted if replay else self.envelopes
        mine = [(i, e) for i, (k, e) in enumerate(pool) if k == kind]
        if not mine:
            return
        i, e = self.rng.choice(mine)
        if not replay:
            del self.envelopes[i]
        if kind == "t":
            args = {"tenant": e["tenant"], "kid": e["kid"], "nonce": e["nonce"], "replay": replay}

            def tverify() -> Any:
                sig = base64.urlsafe_b64decode(e["sig"] + "==")
                r = c.telemetry_verify(
                    e["tenant"], e["kid"], e["timestamp"], e["nonce"], e["body"], sig
                )
                return {"kid": r.kid}, r

            ok = self.call("tverify", args, tverify)
        else:
            args = {"envelope": e, "schema": SCHEMA, "replay": replay}
            ok = self.call(
                "fverify", args, lambda: ({"kid": c.feedback_verify(e, SCHEMA).kid}, True)
            )
        if ok is not None and not replay:
            self.accepted = [*self.accepted[-50:], (kind, e)]

    def pubkey(self, c: Client, kid: str) -> None:
        def lookup() -> Any:
            info = c.kid_info(kid)
            return {"state": str(info.state), "x": info.jwk.get("x")}, info

        info = self.call("kid", {"kid": kid}, lookup)
        if info is not None and info.jwk.get("x"):
            self.rec.pubkey(kid, info.jwk["x"])


def _process(sockets: list[str], keys: list[str], path: str, seconds: float, seed: int) -> None:
    rec = Recorder(Path(path), f"p{seed}")
    worker = _Worker(sockets, keys, rec, seed)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            worker.step()
    finally:
        rec.close()


def run(
    sockets: list[str], keys: list[str], directory: Path, seconds: float, processes: int = 4
) -> list[Path]:
    """Create ``keys``, run the workload, record every kid's public key; the history files."""
    directory.mkdir(parents=True, exist_ok=True)
    setup = Recorder(directory / "setup.jsonl", "setup")
    first = _Worker(sockets[:1], keys, setup, 0)
    for key in keys:
        first.call(
            "create",
            {"key": key},
            lambda k=key: (first.listing(k, first.clients[0].create_key(k)), None),
        )
    ctx = multiprocessing.get_context("spawn")
    paths = [directory / f"p{n}.jsonl" for n in range(1, processes + 1)]
    procs = [
        ctx.Process(target=_process, args=(sockets, keys, str(p), seconds, n), daemon=True)
        for n, p in enumerate(paths, 1)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=seconds + 120)
        if p.is_alive():
            p.kill()
            p.join()
            raise AssertionError(f"history process {p.pid} did not finish in time")
        assert p.exitcode == 0, f"history process exited {p.exitcode}"
    for key in keys:  # every version's public key, from the first daemon
        for v in snapshot(first.clients[0].get_key(key)):
            first.pubkey(first.clients[0], v["kid"])
    setup.close()
    return [setup.path, *paths]
