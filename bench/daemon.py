"""signerd as the harness sees it: its configuration, its load targets, and the
rotation-under-load and footprint scenarios."""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import pwd
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from signerd.testing import ALL_OPERATIONS, SoftHSMToken

from .load import Op, Run, drive
from .refs import b64, message
from .services import ServiceError, start_daemon
from .wire import HttpConnection, WireError


def write_config(
    tmp: Path,
    name: str,
    backend: Mapping[str, Any],
    bootstrap: list[str],
    keys: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """A signerd configuration with one backend and a policy letting this uid do everything,
    and its socket's path."""
    sock = str(tmp / f"{name}.sock")
    config = {
        "server": {"socket": sock, "socket_mode": "0600", "log_level": "info"},
        "keys": {"default_backend": "main", "bootstrap": bootstrap, **(keys or {})},
        "backends": {"main": dict(backend)},
        "audit": {"path": str(tmp / f"{name}-audit.jsonl")},
        "policy": {
            "rules": [
                {
                    "name": "bench",
                    "users": [pwd.getpwuid(os.getuid()).pw_name],
                    "tenants": ["*"],
                    "operations": list(ALL_OPERATIONS),
                }
            ]
        },
    }
    return config, sock


def _check(status: int, answer: bytes) -> Any:
    if status != 200:
        try:
            code = json.loads(answer)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = answer[:80].decode(errors="replace")
        raise WireError(f"HTTP {status} {code}")
    return json.loads(answer)


# --- load targets ---


@dataclass(frozen=True)
class SignerdSign:
    """POST /v1/sign over a raw keep-alive connection (one signature, or a batch of ``batch``)."""

    socket: str
    key: str
    batch: int = 0

    def open(self) -> Op:
        conn = HttpConnection(self.socket)
        key, batch = self.key, self.batch

        def op(i: int) -> object:
            if batch:
                items = [{"key": key, "data": b64(message(i * batch + j))} for j in range(batch)]
                doc = _check(
                    *conn.request("POST", "/v1/sign", json.dumps({"items": items}).encode())
                )
                results = doc["results"]
                if len(results) != batch or not all("signature" in r for r in results):
                    raise WireError("batch item failed")
                return None
            body = json.dumps({"key": key, "data": b64(message(i))}).encode()
            doc = _check(*conn.request("POST", "/v1/sign", body))
            return (doc["kid"], i, doc["signature"])

        return op


@dataclass(frozen=True)
class ClientSign:
    """``signerd.client.Client.sign``: what a gateway using the shipped client pays."""

    socket: str
    key: str

    def open(self) -> Op:
        from signerd.client import Client

        client = Client(self.socket)
        return lambda i: client.sign(self.key, message(i))


def _fresh_signature(socket: str, key: str) -> tuple[str, bytes, bytes]:
    conn = HttpConnection(socket)
    data = message(42)
    try:
        doc = conn.json("POST", "/v1/sign", {"key": key, "data": b64(data)})
    finally:
        conn.close()
    return doc["kid"], data, base64.b64decode(doc["signature"])


@dataclass(frozen=True)
class ServerVerify:
    """POST /v1/verify of a valid signature over a raw keep-alive connection."""

    socket: str
    key: str

    def open(self) -> Op:
        kid, data, signature = _fresh_signature(self.socket, self.key)
        body = json.dumps({"kid": kid, "data": b64(data), "signature": b64(signature)}).encode()
        conn = HttpConnection(self.socket)
        return lambda i: _check(*conn.request("POST", "/v1/verify", body))


@dataclass(frozen=True)
class LocalVerify:
    """``Client.verify_local``: in-process verify against the client's cached JWKS."""

    socket: str
    key: str

    def open(self) -> Op:
        from signerd.client import Client

        kid, data, signature = _fresh_signature(self.socket, self.key)
        client = Client(self.socket)
        return lambda i: client.verify_local(kid, data, signature)


# --- rotation under load ---


@dataclass
class RotationResult:
    run: Run
    steady: tuple[int, int]
    rotating: tuple[int, int]
    rotations: list[tuple[int, int, str | None]] = field(default_factory=list)
    kids_seen: int = 0
    samples_checked: int = 0
    bad_samples: int = 0

    def overlapping(self) -> list[int]:
        """Latencies of the requests that were in flight while a rotate call ran."""
        spans = [(s, e) for s, e, _ in self.rotations]
        out: list[int] = []
        for r in self.run.results:
            for start, lat in zip(r.starts, r.latencies, strict=True):
                end = start + lat
                if any(start < e and end > s for s, e in spans):
                    out.append(lat)
        return out

    def errors_in(self, window: tuple[int, int]) -> int:
        return sum(1 for r in self.run.results for t in r.error_times if window[0] <= t < window[1])


def rotation_under_load(
    sock: str, key: str, callers: int, procs: int, steady: float, rotating: float, warmup: float
) -> RotationResult:
    """``callers`` sign for ``steady`` seconds, then go on while ``key`` rotates every second."""
    tenant, name = key.split("/")
    rotations: list[tuple[int, int, str | None]] = []

    def rotate_every_second(t0: int, duration: float) -> None:
        conn = HttpConnection(sock)
        due = t0 + int(steady * 1e9)
        end = t0 + int(duration * 1e9) - 500_000_000
        try:
            while due < end:
                time.sleep(max(0.0, (due - time.perf_counter_ns()) / 1e9))
                start = time.perf_counter_ns()
                error = None
                try:
                    _check(*conn.request("POST", f"/v1/keys/{tenant}/{name}/rotate", b"{}"))
                except Exception as exc:
                    error = f"rotate: {exc}"
                rotations.append((start, time.perf_counter_ns(), error))
                due += 1_000_000_000
        finally:
            conn.close()

    run = drive(
        SignerdSign(sock, key),
        callers,
        steady + rotating,
        warmup,
        procs=procs,
        keep_every=20,
        during=rotate_every_second,
    )
    t1 = run.t0 + int(steady * 1e9)
    result = RotationResult(
        run, (run.t0, t1), (t1, run.t0 + int((steady + rotating) * 1e9) + 10**9)
    )
    result.rotations = rotations
    _check_samples(sock, result)
    return result


def _check_samples(sock: str, result: RotationResult) -> None:
    """Verify a sample of the signatures returned under load against their kids' public keys."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    conn = HttpConnection(sock)
    keys: dict[str, Ed25519PublicKey] = {}
    try:
        for sample in result.run.samples():
            kid, i, signature = cast(tuple[str, int, str], sample)
            if kid not in keys:
                jwk = conn.json("GET", f"/v1/kids/{kid}")["jwk"]
                raw = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
                keys[kid] = Ed25519PublicKey.from_public_bytes(raw)
            result.samples_checked += 1
            try:
                keys[kid].verify(base64.b64decode(signature), message(i))
            except InvalidSignature:
                result.bad_samples += 1
    finally:
        conn.close()
    result.kids_seen = len(keys)


# --- footprint ---


@dataclass
class Footprint:
    versions: int  # key versions on the token (all tenants) when signerd started
    seed_seconds: float
    ready_seconds: float
    rss_bytes: int  # signerd and all its processes, each process's RSS summed
    pss_bytes: int  # the same processes together, shared pages counted once (PSS)
    processes: int
    rotate_ms: float  # one rotation through the API with all those versions on the token
    sign_ns: list[int]  # one caller signing in sequence with the first stage's key


def seed_token(
    module: str,
    label: str,
    pin: str,
    keys: int,
    versions: int,
    tenant: str = "fp",
    share: tuple[int, int] = (0, 1),
    opened: Any = None,
) -> None:
    """Write ``keys`` keys of ``versions`` versions straight onto the token, in signerd's layout.

    Going through the API would take minutes: every rotation searches the
    token, and SoftHSM's search reads every object. The layout (key pairs
    labelled with their kid, one metadata object per key) comes from
    ``signerd.backends.pkcs11`` itself, and the daemon must then list every version.
    """
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    from signerd.backends import VersionState
    from signerd.backends.pkcs11 import APPLICATION, KeyMeta, meta_label, raw_public_key
    from signerd.backends.pkcs11._generate import ed25519_parameters, make_pair
    from signerd.wire import KeyName

    session = pkcs11.lib(module).get_token(token_label=label).open(user_pin=pin, rw=True)
    if opened is not None:
        opened.set()  # the next seeder may initialise the library now
    part, parts = share
    params = ed25519_parameters(session)
    now = int(time.time())
    for k in range(part, keys, parts):
        key = KeyName(tenant, f"k{k:02d}")
        public = {}
        for v in range(1, versions + 1):
            public[v] = raw_public_key(make_pair(params, key.kid(v))[Attribute.EC_POINT])
        states = {
            v: (VersionState.ACTIVE if v == versions else VersionState.VERIFY_ONLY, now)
            for v in range(1, versions + 1)
        }
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.MODIFIABLE: False,
                Attribute.APPLICATION: APPLICATION,
                Attribute.LABEL: meta_label(key),
                Attribute.VALUE: KeyMeta(seq=1, versions=states, public=public).encode(),
            }
        )
    session.close()


def footprint(
    stack: ExitStack,
    tmp: Path,
    token: SoftHSMToken,
    tenant: str,
    keys: int,
    versions: int,
    total: int,
    sign_key: str,
    signs: int,
    ready_limit: float = 300,
) -> Footprint:
    """Add ``keys`` x ``versions`` versions in ``tenant`` (``total`` on the token then), start
    signerd, time ready, sign ``signs`` times in sequence with ``sign_key``, read RSS."""
    started = time.perf_counter()
    _seed(token, tenant, keys, versions)
    seed_seconds = time.perf_counter() - started
    backend = token.backend_config()
    # Keep every version verify-only, and let loading them take as long as it takes:
    # the point is to measure it.
    settings = {"retain_verify_only": 0, "backend_timeout": float(ready_limit)}
    config, sock = write_config(tmp, f"footprint-{tenant}", backend, [], settings)
    daemon = start_daemon(stack, config, tmp / f"footprint-{tenant}", timeout=ready_limit)
    try:
        conn = HttpConnection(sock)
        listed = conn.json("GET", f"/v1/keys?tenant={tenant}")["keys"]
        loaded = sum(len(k["versions"]) for k in listed)
        if loaded != keys * versions:
            raise ServiceError(f"seeded {keys * versions} versions, signerd lists {loaded}")
        for k in range(keys):
            conn.json("POST", "/v1/sign", {"key": f"{tenant}/k{k:02d}", "data": b64(message(k))})
        conn.json("GET", f"/v1/jwks?tenant={tenant}")
        sign_ns = _sign_in_sequence(conn, sign_key, signs)
        rss, pss, procs = daemon.rss_bytes(), daemon.pss_bytes(), daemon.processes()
        t = time.perf_counter()
        conn.json("POST", f"/v1/keys/{tenant}/k00/rotate", {})
        rotate_ms = (time.perf_counter() - t) * 1000
        conn.close()
        return Footprint(
            total, seed_seconds, daemon.ready_seconds, rss, pss, procs, rotate_ms, sign_ns
        )
    finally:
        daemon.stop()


def _seed(
    token: SoftHSMToken, tenant: str, keys: int, versions: int, timeout: float = 1800
) -> None:
    """Seed with one process per CPU (at most one per key), each with its own session.

    They initialise the library one after another: two processes initialising
    SoftHSM at the same instant once saw no token.
    """
    ctx = multiprocessing.get_context("spawn")  # keep PKCS#11 out of the harness process
    parts = max(1, min(keys, os.cpu_count() or 1))
    seeders = []
    deadline = time.monotonic() + timeout
    for part in range(parts):
        opened = ctx.Event()
        args = (token.module, token.label, token.pin, keys, versions, tenant)
        seeder = ctx.Process(target=seed_token, args=(*args, (part, parts), opened))
        seeder.start()
        seeders.append(seeder)
        while not opened.wait(0.05) and seeder.is_alive() and time.monotonic() < deadline:
            pass
    for seeder in seeders:
        seeder.join(timeout=max(1.0, deadline - time.monotonic()))
        if seeder.is_alive():
            seeder.kill()
            seeder.join()
    codes = [s.exitcode for s in seeders]
    if any(code != 0 for code in codes):
        raise ServiceError(f"seeding the token failed (exit codes {codes})")


def _sign_in_sequence(conn: HttpConnection, key: str, count: int) -> list[int]:
    """Latencies (ns) of ``count`` signs in a row, after a tenth as many to warm up."""
    out: list[int] = []
    perf = time.perf_counter_ns
    for i in range(count // 10 + count):
        body = json.dumps({"key": key, "data": b64(message(i))}).encode()
        t = perf()
        _check(*conn.request("POST", "/v1/sign", body))
        if i >= count // 10:
            out.append(perf() - t)
    return out
