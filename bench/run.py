"""``python -m bench.run [--quick] [--out DIR]``: every path, one run, one table.

Exit status 0 when every path was measured (targets met or not: a benchmark
is not a test), 1 when a part could not be measured (a component missing or
failing), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import cast

from . import cluster, refs
from . import daemon as sd
from . import federation as fed
from . import metrics as bm
from .light import Requests, drive_light, sign_requests
from .load import Run, Target, drive
from .report import (
    Check,
    Row,
    Scaling,
    evaluate,
    percentile,
    row_from_latencies,
    row_from_run,
    table,
    write_chart,
    write_json,
)
from .services import (
    REPO,
    Minimal,
    init_token,
    start_agent,
    start_daemon,
    start_minimal,
    start_minimal_bao,
    start_openbao,
    tree_cpu,
)

MB = 1024 * 1024


@dataclass(frozen=True)
class Profile:
    name: str
    warmup: float  # seconds each caller runs before the measured window
    duration: float  # seconds of each measured window
    procs: int  # worker processes that carry concurrent callers
    rotation_steady: float
    rotation_rotating: float
    # The footprint token grows in three stages; signerd is started on it after each:
    # 1 key x 10 versions, then + keys x versions (1,000 in all), then + keys x versions
    # (10,000 in all).
    footprint_mid: tuple[int, int]
    footprint_large: tuple[int, int]
    footprint_signs: int  # signs in sequence timed at the first and the last stage
    sweep: tuple[int, ...]  # callers for the throughput-against-callers panel
    sweep_duration: float


SMALL = (1, 10)
# --quick seeds 50 and 150 versions, not 1,000 and 10,000 (seeding SoftHSM's file store
# takes 15-45 s per 1,000 here, more as the token fills), so its absolute footprint limits
# are given for information; the sign ratio between the stages is still a target.
QUICK = Profile("quick", 0.3, 1.5, 2, 2.0, 4.0, (10, 4), (10, 10), 300, (1, 8, 64), 1.0)
FULL = Profile(
    "full", 1.0, 8.0, 2, 8.0, 20.0, (10, 99), (10, 900), 2000, (1, 2, 4, 8, 16, 32, 64), 3.0
)


def totals(profile: Profile) -> tuple[int, int, int]:
    """Versions on the footprint token at each stage."""
    small = SMALL[0] * SMALL[1]
    mid = small + profile.footprint_mid[0] * profile.footprint_mid[1]
    return small, mid, mid + profile.footprint_large[0] * profile.footprint_large[1]


CHECKS = [
    Check("inproc-softhsm", "p50_us", "inproc-cryptography", "p50_us", None, None, "p50"),
    Check("inproc-floor", "p50_us", "inproc-softhsm", "p50_us", None, None, "p50"),
    Check("inproc-sign-check", "p50_us", "inproc-softhsm", "p50_us", None, None, "p50"),
    Check("ssh-agent", "p50_us", "inproc-floor", "p50_us", None, None, "p50"),
    Check("openbao-seq", "p50_us", "inproc-cryptography", "p50_us", None, None, "p50"),
    Check("openbao-64", "throughput", "openbao-seq", "throughput", None, None, "throughput"),
    Check("openbao-batch100", "throughput", "openbao-seq", "throughput", None, None, "throughput"),
    Check("signerd-bao-seq", "p50_us", "openbao-seq", "p50_us", "<=", 1.5, "p50"),
    Check("signerd-bao-64", "throughput", "openbao-64", "throughput", ">=", 1.0, "throughput"),
    Check("signerd-bao-64", "p99_us", "openbao-64", "p99_us", "<=", 1.0, "p99"),
    Check("ref-minimal-bao-seq", "p50_us", "openbao-seq", "p50_us", None, None, "p50"),
    Check("signerd-bao-seq", "p50_us", "ref-minimal-bao-seq", "p50_us", None, None, "p50"),
    Check("ref-minimal-bao-64", "throughput", "openbao-64", "throughput", None, None, "rate"),
    Check("signerd-bao-64", "throughput", "ref-minimal-bao-64", "throughput", None, None, "rate"),
    Check("signerd-cluster-64", "throughput", "signerd-bao-64", "throughput", None, None, "rate"),
    Check("signerd-hsm-seq", "p50_us", "inproc-floor", "p50_us", "<=", 1.1, "p50"),
    Check("signerd-hsm-seq", "p99_us", "signerd-hsm-seq", "p50_us", "<=", 3.0, "p99 / own p50"),
    Check("signerd-hsm-seq", "p50_us", "ref-minimal-seq", "p50_us", "<=", 1.15, "p50"),
    Check("ref-minimal-seq", "p50_us", "inproc-floor", "p50_us", None, None, "p50"),
    Check("signerd-hsm-seq-client", "p50_us", "signerd-hsm-seq", "p50_us", None, None, "p50"),
    Check("signerd-hsm-32", "throughput", "inproc-softhsm", "throughput", ">=", 0.85, "rate"),
    Check("signerd-hsm-32", "errors", None, "", "<=", 0, "failed requests"),
    Check("signerd-hsm-32", "throughput", "ref-minimal-32", "throughput", ">=", 0.9, "rate"),
    Check(
        "signerd-hsm-32",
        "notes.server_cpu_us",
        "inproc-sign-check",
        "notes.cpu_us",
        "<=",
        1.5,
        "server CPU per signature",
    ),
    Check("signerd-hsm-32", "notes.client_cpu_us", None, "", None, None, "µs callers' CPU/sig"),
    Check("ref-minimal-32", "throughput", "inproc-softhsm", "throughput", None, None, "rate"),
    Check(
        "ref-minimal-32",
        "notes.server_cpu_us",
        "inproc-sign-check",
        "notes.cpu_us",
        None,
        None,
        "server CPU per signature",
    ),
    Check("ref-minimal-32", "notes.client_cpu_us", None, "", None, None, "µs callers' CPU/sig"),
    Check(
        "signerd-hsm-batch100",
        "per_sig_us",
        "inproc-sign-check",
        "per_sig_us",
        "<=",
        1.25,
        "time per signature",
    ),
    Check(
        "signerd-hsm-seq-metrics-on",
        "p50_us",
        "signerd-hsm-seq-metrics-off",
        "p50_us",
        "<=",
        1.05,
        "p50, metrics on vs off",
    ),
    Check("signerd-verify", "p50_us", "inproc-verify", "p50_us", "<=", 2.5, "p50"),
    Check("client-verify-local", "p50_us", "inproc-verify", "p50_us", None, None, "p50"),
    *(
        Check(f"signerd-fed-{s}{n}", m, f"inproc-fed-{s}{n}", m, None, None, label)
        for s in ("sqlite", "redis")
        for n, m, label in (("", "p50_us", "p50"), ("-32", "throughput", "throughput"))
    ),
    Check("rotation-during", "errors", None, "", "<=", 0, "failed requests"),
    Check("rotation-during", "p99_us", "rotation-steady", "p99_us", "<=", 3.0, "p99"),
    Check("footprint-rss", "value", None, "", None, None, "MB, RSS of each process summed"),
    Check("footprint-pss", "value", None, "", "<=", 120, "MB, all processes, 1,000 versions"),
    Check("footprint-ready", "value", None, "", "<", 2.0, "s to ready, 1,000 versions"),
    Check(
        "footprint-sign-large",
        "p50_us",
        "footprint-sign-small",
        "p50_us",
        "<=",
        1.1,
        "p50, 10,000 versions vs 10",
    ),
    Check(
        "footprint-sign-large",
        "p99_us",
        "footprint-sign-small",
        "p99_us",
        "<=",
        2.0,
        "p99, 10,000 versions vs 10",
    ),
    Check("footprint-ready-large", "value", None, "", "<", 5.0, "s to ready, 10,000 versions"),
]


def checks_for(profile: Profile) -> list[Check]:
    """The checks; absolute footprint limits apply only at 1,000 and 10,000 versions."""
    small, mid, large = totals(profile)
    out = []
    for c in CHECKS:
        if c.path in ("footprint-pss", "footprint-ready") and mid != 1000:
            unit = "MB, all processes" if c.path == "footprint-pss" else "s to ready"
            c = replace(c, op=None, limit=None, label=f"{unit} with {mid} versions")
        elif c.path == "footprint-ready-large" and large != 10_000:
            c = replace(c, op=None, limit=None, label=f"s to ready with {large} versions")
        elif c.path == "footprint-sign-large":
            c = replace(c, label=f"{c.metric[:3]}, {large:,} versions vs {small}")
        out.append(c)
    return out


# Every path, in the order of the table.
PATHS = [
    "inproc-cryptography",
    "inproc-softhsm",
    "inproc-floor",
    "inproc-sign-check",
    "ssh-agent",
    "openbao-seq",
    "openbao-64",
    "openbao-batch100",
    "signerd-bao-seq",
    "signerd-bao-64",
    "ref-minimal-bao-seq",
    "ref-minimal-bao-64",
    *(path for path, _ in cluster.PATHS),
    "signerd-hsm-seq",
    "signerd-hsm-seq-client",
    "signerd-hsm-32",
    "signerd-hsm-batch100",
    *(p for p, _ in bm.PATHS),
    "ref-minimal-seq",
    "ref-minimal-32",
    "inproc-verify",
    "signerd-verify",
    "client-verify-local",
    "inproc-fed-sqlite",
    "signerd-fed-sqlite",
    "inproc-fed-sqlite-32",
    "signerd-fed-sqlite-32",
    "inproc-fed-redis",
    "signerd-fed-redis",
    "inproc-fed-redis-32",
    "signerd-fed-redis-32",
    "rotation-steady",
    "rotation-during",
    "footprint-rss",
    "footprint-pss",
    "footprint-ready",
    "footprint-sign-small",
    "footprint-sign-large",
    "footprint-ready-large",
]


class Bench:
    def __init__(self, profile: Profile) -> None:
        self.p = profile
        self.rows: dict[str, Row] = {}
        self.latencies: dict[str, list[int]] = {}
        self.meta_notes: dict[str, object] = {}
        self.scaling: Scaling = {}

    def log(self, text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def add(self, row: Row, latencies: list[int] | None = None) -> None:
        self.rows[row.path] = row
        if latencies:
            self.latencies[row.path] = latencies
        if row.failure:
            self.log(f"{row.path}: ERROR {row.failure.strip().splitlines()[-1]}")
        elif row.unit:
            self.log(f"{row.path}: {row.value:.3g} {row.unit}")
        else:
            self.log(
                f"{row.path}: p50 {row.p50_us:.0f} µs, p99 {row.p99_us:.0f} µs, "
                f"{row.throughput or 0:,.0f}/s, {row.errors} errors"
            )

    def measure(
        self,
        path: str,
        what: str,
        target: Target,
        callers: int = 1,
        per_op: int = 1,
        server: int | None = None,
        light: Requests | None = None,
    ) -> None:
        """Drive ``target`` (or, with ``light``, ``bench.light``'s callers) and add its row.

        With ``server`` (a root pid), the notes hold the server's CPU per signature
        (``server_cpu_us``, all its processes) and the callers' (``client_cpu_us``);
        without, the callers' as ``cpu_us`` (the in-process paths).
        """
        self.log(f"{path}: {callers} caller(s), {self.p.duration:g} s")
        try:
            run, server_cpu = self._drive(target, callers, self.p.duration, per_op, server, light)
            row = row_from_run(path, what, run)
            row.notes.update(_cpu_notes(run, server, server_cpu))
            self.add(row, run.latencies())
        except Exception as exc:
            self.add(Row(path, what, callers=callers, per_op=per_op, failure=_describe(exc)))

    def _drive(
        self,
        target: Target,
        callers: int,
        duration: float,
        per_op: int = 1,
        server: int | None = None,
        light: Requests | None = None,
    ) -> tuple[Run, float]:
        """One run; the server's CPU seconds in its measured window (0 without ``server``)."""
        start: list[float] = []

        def during(t0: int, duration: float) -> None:
            if server is not None:
                start.append(tree_cpu(server))

        procs = self.p.procs if callers > 1 else 1
        if light is not None:
            run = drive_light(light, callers, duration, self.p.warmup, procs, during=during)
        else:
            run = drive(
                target, callers, duration, self.p.warmup, procs, per_op=per_op, during=during
            )
        cpu = tree_cpu(server) - start[0] if server is not None and start else 0.0
        return run, cpu

    def sweep(
        self,
        series: str,
        target: Target,
        known: dict[int, str],
        light: Requests | None = None,
    ) -> None:
        """Throughput of ``target`` at each of the profile's caller counts, for the chart.

        ``known`` maps caller counts to rows measured already, which are reused.
        """
        points = self.scaling.setdefault(series, {})
        for callers in self.p.sweep:
            row = self.rows.get(known.get(callers, ""))
            if row is not None and row.throughput and not row.failure:
                points[callers] = row.throughput
                continue
            try:
                run, _ = self._drive(
                    target, callers, self.p.sweep_duration, light=light if callers > 1 else None
                )
            except Exception as exc:
                self.log(f"sweep {series} x{callers}: {_describe(exc)}")
                continue
            errors = sum(run.errors.values())
            if run.failure or not run.ops:
                self.log(f"sweep {series} x{callers}: {run.failure or 'no operation succeeded'}")
                continue
            points[callers] = run.throughput
            self.log(
                f"sweep {series} x{callers}: {run.throughput:,.0f}/s"
                + (f", {errors} errors" if errors else "")
            )

    @contextmanager
    def section(self, paths: list[tuple[str, str]]) -> Iterator[None]:
        """Run a group of paths; if its set-up fails, each path not measured yet is an error."""
        try:
            yield
        except Exception as exc:
            for path, what in paths:
                if path not in self.rows:
                    self.add(Row(path, what, failure=_describe(exc)))

    # --- the parts ---

    def references(self, stack: ExitStack, tmp: Path) -> None:
        self.measure(
            "inproc-cryptography", "Ed25519 sign with cryptography, in process", refs.CryptoSign()
        )
        self.measure(
            "inproc-verify", "Ed25519 verify with cryptography, in process", refs.CryptoVerify()
        )
        what = "SoftHSM2 sign through python-pkcs11, in process"
        with self.section([("inproc-softhsm", what)]):
            token = init_token(tmp, "bench-ref")
            self.measure(
                "inproc-softhsm", what, refs.SoftHSMSign(token.module, token.label, token.pin)
            )
        what = "SoftHSM2 sign + cryptography verify + fsync'd 300-byte append, in process"
        with self.section([("inproc-floor", what)]):
            floor = refs.SoftHSMFloor(token.module, token.label, token.pin, audit_dir=str(tmp))
            self.measure("inproc-floor", what, floor)
        what = "SoftHSM2 sign + cryptography verify, in process"
        with self.section([("inproc-sign-check", what)]):
            check = refs.SoftHSMFloor(token.module, token.label, token.pin)
            self.measure("inproc-sign-check", what, check)
        what = "OpenSSH ssh-agent, agent protocol over its socket"
        with self.section([("ssh-agent", what)]):
            agent = start_agent(stack, tmp)
            self.measure("ssh-agent", what, refs.AgentSign(agent.socket))

    def openbao(self, tmp: Path) -> None:
        paths = [
            ("openbao-seq", "OpenBao transit direct, one caller"),
            ("openbao-64", "OpenBao transit direct, 64 callers"),
            ("openbao-batch100", "OpenBao transit direct, batch_input of 100"),
            ("signerd-bao-seq", "signerd on OpenBao, one caller"),
            ("signerd-bao-64", "signerd on OpenBao, 64 callers"),
            ("ref-minimal-bao-seq", "ref-minimal server on OpenBao transit, one caller"),
            ("ref-minimal-bao-64", "ref-minimal server on OpenBao transit, 64 callers"),
        ]
        with self.section(paths), ExitStack() as stack:
            self.log("starting bao server -dev")
            bao = start_openbao(stack, tmp)
            bao.call("POST", "/v1/transit/keys/bench-direct", {"type": "ed25519"})
            direct = refs.BaoSign(bao.host, bao.port, bao.token, "bench-direct")
            batch = refs.BaoSign(bao.host, bao.port, bao.token, "bench-direct", batch=100)
            self.measure(*paths[0], direct)
            self.measure(*paths[1], direct, callers=64)
            self.measure(*paths[2], batch, per_op=100)
            backend = {
                "type": "vault",
                "addr": bao.url,
                "token_file": str(bao.token_file),
                "mount": "transit",
                "metadata_mount": "secret",
                "timeout": 5,
            }
            config, sock = sd.write_config(tmp, "signerd-bao", backend, ["benchv/k1"])
            daemon = start_daemon(stack, config, tmp / "signerd-bao")
            self.meta_notes["signerd_bao_ready_seconds"] = daemon.ready_seconds
            self.measure(*paths[3], sd.SignerdSign(sock, "benchv/k1"), server=daemon.pid)
            self.measure(
                *paths[4], sd.SignerdSign(sock, "benchv/k1"), callers=64, server=daemon.pid
            )
            with self.section(paths[5:7]):  # the least a server adds to transit
                ref = start_minimal_bao(stack, tmp, bao, "bench-ref", procs=self.p.procs)
                ref_sign = sd.SignerdSign(ref.socket, "ref/k")
                self.measure(*paths[5], ref_sign, server=ref.pid)
                self.measure(*paths[6], ref_sign, callers=64, server=ref.pid)
            self.sweep("openbao direct", direct, {1: "openbao-seq", 64: "openbao-64"})
            self.sweep(
                "signerd on OpenBao",
                sd.SignerdSign(sock, "benchv/k1"),
                {1: "signerd-bao-seq", 64: "signerd-bao-64"},
            )
            self.meta_notes["signerd_bao_rss_mb_after_load"] = daemon.rss_bytes() / MB

    def signerd_hsm(self, tmp: Path) -> None:
        rot_paths = [
            ("rotation-steady", "signerd on SoftHSM, 32 callers, before rotations"),
            ("rotation-during", "signerd on SoftHSM, 32 callers, key rotating every second"),
        ]
        paths = [
            ("signerd-hsm-seq", "signerd on SoftHSM, one caller, raw HTTP"),
            ("signerd-hsm-seq-client", "signerd on SoftHSM, one caller, signerd.client.Client"),
            ("signerd-hsm-32", "signerd on SoftHSM, 32 callers"),
            ("signerd-hsm-batch100", "signerd on SoftHSM, batch of 100 items"),
            ("signerd-verify", "signerd /v1/verify, one caller"),
            ("client-verify-local", "Client.verify_local from the cached JWKS"),
            ("ref-minimal-seq", "ref-minimal server (bench/minimal.py) on SoftHSM, one caller"),
            ("ref-minimal-32", "ref-minimal server (bench/minimal.py) on SoftHSM, 32 callers"),
            *rot_paths,
        ]
        with self.section(paths), ExitStack() as stack:
            token = init_token(tmp, "bench-daemon")
            backend = token.backend_config()
            config, sock = sd.write_config(tmp, "signerd-hsm", backend, ["bench/k1", "bench/rot"])
            daemon = start_daemon(stack, config, tmp / "signerd-hsm")
            self.meta_notes["signerd_hsm_ready_seconds_two_new_keys"] = daemon.ready_seconds
            ref: Minimal | None = None
            with self.section(paths[6:8]):  # signerd's rows go on without it
                ref = start_minimal(stack, tmp, token, procs=self.p.procs)
            pid, sign = daemon.pid, sd.SignerdSign(sock, "bench/k1")
            light = sign_requests(sock, "bench/k1")
            ref_sign = sd.SignerdSign(ref.socket, "ref/k") if ref else None
            # signerd and ref-minimal side by side: each row right after the other
            self.measure(*paths[0], sign, server=pid)
            if ref and ref_sign:
                self.measure(*paths[6], ref_sign, server=ref.pid)
            self.measure(*paths[1], sd.ClientSign(sock, "bench/k1"), server=pid)
            self.measure(*paths[2], sign, callers=32, server=pid, light=light)
            if ref and ref_sign:
                ref_light = sign_requests(ref.socket, "ref/k")
                self.measure(*paths[7], ref_sign, callers=32, server=ref.pid, light=ref_light)
            batch = sd.SignerdSign(sock, "bench/k1", batch=100)
            self.measure(*paths[3], batch, per_op=100, server=pid)
            self.measure(*paths[4], sd.ServerVerify(sock, "bench/k1"), server=pid)
            self.measure(*paths[5], sd.LocalVerify(sock, "bench/k1"))
            self.sweep(
                "signerd on SoftHSM", sign, {1: "signerd-hsm-seq", 32: "signerd-hsm-32"}, light
            )
            if ref and ref_sign:
                self.sweep(
                    "ref-minimal on SoftHSM",
                    ref_sign,
                    {1: "ref-minimal-seq", 32: "ref-minimal-32"},
                    sign_requests(ref.socket, "ref/k"),
                )
            with self.section(rot_paths):
                self.rotation(sock, rot_paths)
            self.meta_notes["signerd_hsm_rss_mb_after_load"] = daemon.rss_bytes() / MB

    def rotation(self, sock: str, paths: list[tuple[str, str]]) -> None:
        p = self.p
        self.log(
            f"rotation: 32 callers, {p.rotation_steady:g} s steady, "
            f"{p.rotation_rotating:g} s rotating every second"
        )
        result = sd.rotation_under_load(
            sock, "bench/rot", 32, p.procs, p.rotation_steady, p.rotation_rotating, p.warmup
        )
        run = result.run
        steady = row_from_run(*paths[0], run, run.latencies(result.steady), p.rotation_steady)
        steady.errors = result.errors_in(result.steady)
        during = row_from_run(*paths[1], run, run.latencies(result.rotating), p.rotation_rotating)
        rotate_errors = [e for _, _, e in result.rotations if e]
        during.errors = result.errors_in(result.rotating) + len(rotate_errors) + result.bad_samples
        during.error_kinds = dict(run.errors.most_common(5))
        if rotate_errors:
            during.error_kinds[rotate_errors[0]] = len(rotate_errors)
        overlap = sorted(result.overlapping())
        during.notes = {
            "rotations": len(result.rotations),
            "rotate_ms": [round((e - s) / 1e6, 2) for s, e, _ in result.rotations],
            "kids_seen_in_samples": result.kids_seen,
            "samples_verified": result.samples_checked,
            "bad_samples": result.bad_samples,
            "requests_overlapping_a_rotate_call": len(overlap),
            "p99_us_overlapping_a_rotate_call": (
                percentile(overlap, 99) / 1000 if overlap else None
            ),
        }
        if len(result.rotations) < 2 or result.kids_seen < 2:
            during.failure = f"rotations did not happen ({len(result.rotations)} rotate calls)"
        self.add(steady, run.latencies(result.steady))
        self.add(during, run.latencies(result.rotating))

    def federation(self, tmp: Path) -> None:
        """Telemetry verify with each nonce store: signerd vs in process with the same store."""
        what = {
            "inproc": "telemetry verify in process + {store} nonce store",
            "signerd": "signerd /v1/telemetry/verify, {store} nonce store",
        }
        paths = [
            (f"{side}-fed-{store}{n}", what[side].format(store=store) + label)
            for store in ("sqlite", "redis")
            for n, label in (("", ", one caller"), ("-32", ", 32 callers"))
            for side in ("inproc", "signerd")
        ]
        with self.section(paths), ExitStack() as stack:
            redis = fed.start_redis(stack, tmp)
            token = init_token(tmp, "bench-fed")
            backend = token.backend_config()
            for store in ("sqlite", "redis"):
                config, sock = sd.write_config(tmp, f"signerd-fed-{store}", backend, [])
                config["federation"] = fed.federation_config(tmp / f"fed-{store}", store, redis.url)
                fed_daemon = start_daemon(stack, config, tmp / f"signerd-fed-{store}")
                fed.trust_producer(sock)
                where = str(tmp / "fed-ref-nonces.sqlite3") if store == "sqlite" else redis.url
                ref = fed.InprocTelemetryVerify(store, where)
                server = fed.SignerdTelemetryVerify(sock)
                for (path, label), target in zip(
                    [p for p in paths if f"-{store}" in p[0]],
                    cast(tuple[Target, ...], (ref, server, ref, server)),
                    strict=True,
                ):
                    self.measure(
                        path,
                        label,
                        target,
                        callers=32 if path.endswith("-32") else 1,
                        server=fed_daemon.pid if path.startswith("signerd-") else None,
                    )

    def footprint(self, tmp: Path) -> None:
        p = self.p
        small, mid, large = totals(p)
        paths = [
            ("footprint-rss", f"signerd RSS, each process summed, {mid:,} key versions loaded"),
            (
                "footprint-pss",
                f"signerd memory, all processes together (PSS), {mid:,} key versions loaded",
            ),
            ("footprint-ready", f"signerd start to /v1/ready 200, {mid:,} versions on the token"),
            ("footprint-sign-small", f"signerd sign, one caller, {small:,} versions on the token"),
            ("footprint-sign-large", f"signerd sign, one caller, {large:,} versions on the token"),
            (
                "footprint-ready-large",
                f"signerd start to /v1/ready 200, {large:,} versions on the token",
            ),
        ]
        config_note = (
            "keys.retain_verify_only = 0 (every version stays loaded); "
            "keys.backend_timeout = 300 (default 5) so that a slow load is measured"
        )
        with self.section(paths), ExitStack() as stack:
            token = init_token(tmp, "bench-fp")
            sign_key = "fa/k00"
            stages = {}
            for name, tenant, (keys, versions), total in (
                ("small", "fa", SMALL, small),
                ("mid", "fb", p.footprint_mid, mid),
                ("large", "fc", p.footprint_large, large),
            ):
                self.log(f"footprint: + {keys} keys x {versions} versions ({total:,} in all)")
                fp = sd.footprint(
                    stack, tmp, token, tenant, keys, versions, total, sign_key, p.footprint_signs
                )
                stages[name] = fp
                self.log(
                    f"footprint {total:,} versions: seeded in {fp.seed_seconds:.1f} s, ready "
                    f"{fp.ready_seconds:.2f} s, {fp.pss_bytes / MB:.0f} MB together (RSS summed "
                    f"{fp.rss_bytes / MB:.0f} MB) in {fp.processes} process(es)"
                )
            notes = {
                name: {
                    "versions": fp.versions,
                    "seed_seconds": round(fp.seed_seconds, 2),
                    "ready_seconds": round(fp.ready_seconds, 3),
                    "rss_mb_each_process_summed": round(fp.rss_bytes / MB, 1),
                    "pss_mb_all_processes": round(fp.pss_bytes / MB, 1),
                    "processes": fp.processes,
                    "rotate_ms_with_all_versions_on_token": round(fp.rotate_ms, 1),
                }
                for name, fp in stages.items()
            }
            notes_all: dict[str, object] = {"stages": notes, "config": config_note}
            m, lg = stages["mid"], stages["large"]
            self.add(Row(*paths[0], value=m.rss_bytes / MB, unit="MB", notes=notes_all))
            self.add(Row(*paths[1], value=m.pss_bytes / MB, unit="MB", notes=notes_all))
            self.add(Row(*paths[2], value=m.ready_seconds, unit="s", notes=notes_all))
            for (path, what), fp in ((paths[3], stages["small"]), (paths[4], lg)):
                row = row_from_latencies(path, what, fp.sign_ns)
                row.notes = {"key": sign_key, "versions_on_token": fp.versions}
                self.add(row, fp.sign_ns)
            self.add(Row(*paths[5], value=lg.ready_seconds, unit="s", notes=notes_all))

    def run_all(self) -> None:
        with tempfile.TemporaryDirectory(prefix="sdb-") as d, ExitStack() as stack:
            tmp = Path(d)
            for part in (
                lambda: self.references(stack, tmp),
                lambda: self.openbao(tmp),
                lambda: cluster.measure(self, tmp),
                lambda: self.signerd_hsm(tmp),
                lambda: bm.run(self, tmp),
                lambda: self.federation(tmp),
                lambda: self.footprint(tmp),
            ):
                _guard(part, self.log)


def _guard(part: Callable[[], None], log: Callable[[str], None]) -> None:
    try:
        part()
    except Exception:  # a part's own sections record its paths; this is a last resort
        log("part failed:\n" + traceback.format_exc())


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _cpu_notes(run: Run, server: int | None, server_cpu: float) -> dict[str, float]:
    """CPU per signature in the measured window, in µs: the server's (all its processes)
    and the callers', or the callers' alone for a path without a server."""
    sigs = run.ops * run.per_op
    if not sigs:
        return {}
    client = round(1e6 * run.client_cpu / sigs, 1)
    if server is None:
        return {"cpu_us": client}
    return {"server_cpu_us": round(1e6 * server_cpu / sigs, 1), "client_cpu_us": client}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="short windows (under 2 minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "bench" / "results",
        help="directory for results.json and latency.png (default bench/results)",
    )
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _stop_on_sigterm)  # so that every server gets stopped
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(profile)
    started = time.time()
    load_before = os.getloadavg()
    bench.run_all()
    for path in PATHS:
        if path not in bench.rows:
            bench.rows[path] = Row(path, "", failure="not run")
    rows = sorted(bench.rows.values(), key=lambda r: PATHS.index(r.path) if r.path in PATHS else 99)
    by_path = {r.path: r for r in rows}
    outcomes = [evaluate(c, by_path) for c in checks_for(profile)]
    meta = {
        "profile": asdict(profile),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_average_before_after": [round(x, 2) for x in (*load_before, *os.getloadavg())],
        "layout": "callers are threads with one keep-alive connection each; one caller runs "
        f"in one worker process, concurrent callers are spread over {profile.procs} "
        "worker processes (spawned); signerd-hsm-32, ref-minimal-32 and the SoftHSM sweeps "
        "use bench.light instead (one epoll loop per process, pre-encoded requests); the "
        "daemons and servers run in their own processes; server_cpu_us and client_cpu_us "
        "(notes) are CPU per signature in the measured window, from /proc and process_time",
        "scaling_signatures_per_second": {
            series: {str(c): round(v, 1) for c, v in sorted(points.items())}
            for series, points in bench.scaling.items()
        },
        **bench.meta_notes,
    }
    print(table(rows, outcomes))
    print()
    failed = [r.path for r in rows if not r.measured()]
    failed += [o.path for o in outcomes if o.status == "error"]
    met = sum(o.status == "met" for o in outcomes)
    missed = sum(o.status == "missed" for o in outcomes)
    print(
        f"targets: {met} met, {missed} missed; {len(set(failed))} path(s) not measured; "
        f"{meta['seconds']} s ({profile.name})"
    )
    write_json(args.out / "results.json", meta, rows, outcomes)
    try:
        write_chart(
            args.out / "latency.png",
            rows,
            bench.latencies,
            f"signerd benchmark ({profile.name}), {time.strftime('%Y-%m-%d %H:%M')}",
            bench.scaling,
        )
    except Exception as exc:
        print(f"chart: {_describe(exc)}", file=sys.stderr)
        failed.append("chart")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'latency.png'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
