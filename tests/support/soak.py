"""The soak's load: several client processes sending a steady mix of requests to one daemon.

Each process sends, at a paced rate, signs (sometimes a batch of one), verifies of its own
recent signatures (one in ten tampered), telemetry and feedback envelopes signed and then
verified, and (process 1 only) every ``rotate_every`` seconds a rotation of the rotating key
followed by the retirement of its older verify-only versions and the destruction of its
retired ones, so the token's objects stay bounded. Every request carries an
``X-Request-Id`` of its own and is written to the process's request log, one JSON line::

    [request_id, what, start, seconds, status, code, kid]

``start`` is ``time.monotonic()`` (comparable across the processes of one machine),
``status`` is 0 when no answer came, ``code`` is the wire code of an error answer (or
``transport:NAME``), ``kid`` the kid an answer named. Which codes are expected, and why,
is ``expected`` below; everything else is an unexpected error.
"""

from __future__ import annotations

import base64
import http.client
import json
import multiprocessing
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from signerd.client._ops import (
    Op,
    decode_answer,
    op_create,
    op_feedback_sign,
    op_feedback_verify,
    op_get_key,
    op_rotate,
    op_sign,
    op_telemetry_sign,
    op_telemetry_verify,
    op_verify,
    op_version,
)
from signerd.client._transport import UnixHTTPConnection, new_idempotency_key
from signerd.errors import SignerdError

__all__ = ["ADMIN", "INTENT_OPS", "Load", "Request", "expected", "read_requests", "run_load"]

T = TypeVar("T")
WEIGHTS = {"sign": 40, "verify": 20, "tsign": 10, "tverify": 10, "fsign": 10, "fverify": 10}
ADMIN = ("create", "rotate", "retire", "destroy")
INTENT_OPS = frozenset({"sign", "tsign", "fsign", *ADMIN})
"""Requests whose audit trail holds an intent record before the outcome record."""
SCHEMA = "soak.v1"
_RECONNECT_EVERY = 50  # requests on one connection before a fresh one (spreads the workers)
_KEEP = 32  # recent signatures a process keeps to verify
_ENVELOPES = 4  # envelopes waiting for their verify (oldest first: well within the skew)


@dataclass(frozen=True)
class Request:
    """One line of a request log."""

    rid: str
    what: str
    start: float
    seconds: float
    status: int
    code: str
    kid: str

    @property
    def end(self) -> float:
        return self.start + self.seconds


def expected(req: Request, rotating: str) -> bool:
    """Whether an error answer is one the workload provokes on purpose: a tampered verify
    (``invalid_signature``), and a verify of a signature whose version of the rotating key
    was retired or destroyed by the lifecycle meanwhile (``retired_kid``, ``destroyed_kid``)."""
    if not req.what.endswith(("verify", "verify!")):
        return False
    if req.what.endswith("!") and req.code == "invalid_signature":
        return True
    gone = req.kid.startswith(rotating.replace("/", ".") + ".v")
    return gone and req.code in ("retired_kid", "destroyed_kid")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Load:
    """One client process's requests over one connection at a time."""

    def __init__(self, socket: str, name: str, log: Path, seed: int) -> None:
        self.socket = socket
        self.name = name
        self.log = log.open("a", buffering=1 << 16)
        self.rng = random.Random(seed)
        self.count = 0
        self.conn: UnixHTTPConnection | None = None
        self.on_conn = 0

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.log.close()

    def call(self, what: str, op: Op[T], kid: str = "") -> T | None:
        """Send ``op``; its parsed answer, or None after an error answer or none at all."""
        self.count += 1
        rid = f"{self.name}-{self.count}"
        headers = {"Accept": "application/json", "X-Request-Id": rid}
        body = op.encoded()
        if body is not None:
            headers["Content-Type"] = "application/json"
        if op.admin:
            headers["Idempotency-Key"] = new_idempotency_key()
        if self.conn is None or self.on_conn >= _RECONNECT_EVERY:
            if self.conn is not None:
                self.conn.close()
            self.conn, self.on_conn = UnixHTTPConnection(self.socket, 30.0), 0
        self.on_conn += 1
        start = time.monotonic()
        value: T | None = None
        try:
            self.conn.request(op.method, op.path, body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
            status, code = resp.status, ""
            if resp.getheader("X-Request-Id") != rid:
                code = "request_id_not_echoed"
            value = op.parse(*decode_answer(status, rid, data))
        except SignerdError as exc:
            code = exc.code
        except (OSError, http.client.HTTPException) as exc:
            status, code = 0, f"transport:{type(exc).__name__}"
            self.conn.close()
            self.conn = None
        seconds = time.monotonic() - start
        named = getattr(value, "kid", None) or (value[0] if isinstance(value, tuple) else kid)
        line = [rid, what, round(start, 6), round(seconds, 6), status, code, str(named or "")]
        self.log.write(json.dumps(line) + "\n")
        return value if not code else None


class _Mix:
    """The request mix of one process."""

    def __init__(self, load: Load, keys: list[str], rotating: str) -> None:
        self.load, self.keys, self.rotating = load, keys, rotating
        self.signed: list[tuple[str, bytes, bytes]] = []
        self.telemetry: list[tuple[Any, bytes]] = []
        self.feedback: list[dict[str, Any]] = []

    def step(self) -> None:
        load, rng = self.load, self.load.rng
        what = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
        key = rng.choice(self.keys)
        if what == "sign":
            data = rng.randbytes(32)
            s = load.call("sign", op_sign(key, data))
            if s is not None:
                self.signed = [*self.signed[-_KEEP:], (s.kid, data, s.signature)]
        elif what == "verify" and self.signed:
            kid, data, sig = rng.choice(self.signed)
            tampered = rng.random() < 0.1
            message = data + b"x" if tampered else data
            load.call("verify!" if tampered else "verify", op_verify(kid, message, sig), kid)
        elif what == "tsign":
            body = b'{"n":%d}' % rng.randrange(1 << 30)
            t = load.call("tsign", op_telemetry_sign(key, body))
            if t is not None:
                self.telemetry = [*self.telemetry[-_ENVELOPES:], (t, body)]
        elif what == "tverify" and self.telemetry:
            t, body = self.telemetry.pop(0)
            tenant = t.kid.split(".")[0]
            op = op_telemetry_verify(tenant, t.kid, t.timestamp, t.nonce, body, t.signature)
            load.call("tverify", op, t.kid)
        elif what == "fsign":
            doc = {"n": rng.randrange(1 << 30), "s": "é", "x": [1.5, True, None]}
            e = load.call("fsign", op_feedback_sign(key, SCHEMA, doc))
            if e is not None:
                self.feedback = [*self.feedback[-_ENVELOPES:], e.to_json()]
        elif what == "fverify" and self.feedback:
            wire = self.feedback.pop(0)
            load.call("fverify", op_feedback_verify(wire, SCHEMA), str(wire["kid"]))

    def lifecycle(self) -> None:
        """Rotate the rotating key; retire all but its newest verify-only version; destroy
        its retired versions."""
        load, key = self.load, self.rotating
        if load.call("rotate", op_rotate(key, False)) is None:
            return
        d = load.call("get", op_get_key(key))
        if d is None:
            return
        verify_only = [v for v in d.versions if str(v.state) == "verify-only"]
        for v in verify_only[:-1]:
            load.call("retire", op_version(key, v.version, "retire", {}), v.kid)
        for v in d.versions:
            if str(v.state) == "retired":
                body = {"confirm": v.kid}
                load.call("destroy", op_version(key, v.version, "destroy", body), v.kid)


def _process(
    socket: str, keys: list[str], rotating: str, log: str, n: int, until: float, plan: Any
) -> None:
    rate, rotate_every = plan
    load = Load(socket, f"soak{n}", Path(log), seed=n)
    mix = _Mix(load, keys, rotating)
    next_rotation = time.monotonic() + rotate_every
    next_step = time.monotonic()
    try:
        while (now := time.monotonic()) < until:
            if n == 1 and now >= next_rotation:
                mix.lifecycle()
                next_rotation += rotate_every
            mix.step()
            next_step += 1.0 / rate  # paced: a steady offered load, not as fast as possible
            pause = next_step - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_step = time.monotonic()  # behind: do not burst to catch up
    finally:
        load.close()


def create_keys(socket: str, keys: list[str], log: Path) -> None:
    """Create ``keys`` (their requests go to the request log too)."""
    load = Load(socket, "setup", log, seed=0)
    try:
        for key in keys:
            assert load.call("create", op_create(key)) is not None, log.read_text()
    finally:
        load.close()


def run_load(
    socket: str,
    keys: list[str],
    rotating: str,
    directory: Path,
    seconds: float,
    *,
    processes: int = 4,
    rate: float = 25.0,
    rotate_every: float = 4.0,
    during: Callable[[float], None] | None = None,
) -> list[Path]:
    """Run ``processes`` load processes for ``seconds`` (``rate`` requests a second each);
    ``during(until)`` runs in this process meanwhile. The request logs."""
    ctx = multiprocessing.get_context("spawn")
    logs = [directory / f"requests.{n}.jsonl" for n in range(1, processes + 1)]
    until = time.monotonic() + seconds
    procs = [
        ctx.Process(
            target=_process,
            args=(socket, keys, rotating, str(log), n, until, (rate, rotate_every)),
            daemon=True,
        )
        for n, log in enumerate(logs, 1)
    ]
    for p in procs:
        p.start()
    try:
        if during is not None:
            during(until)
    finally:
        for p in procs:
            p.join(timeout=max(0.0, until - time.monotonic()) + 60)
            if p.is_alive():
                p.kill()
                p.join()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return logs


def read_requests(paths: list[Path]) -> list[Request]:
    """Every request of the logs, by start time."""
    out = [
        Request(*json.loads(line))
        for path in paths
        for line in path.read_text().splitlines()
        if line.strip()
    ]
    return sorted(out, key=lambda r: r.start)
