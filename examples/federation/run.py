"""Run the federation end to end: two signerd daemons, a gateway and a producer over real mTLS.

    python -m examples.federation [--keep DIR]

1. Certificates: a CA, the gateway's server certificate for 127.0.0.1, the
   producer's client certificate (pinned for identity ``spectrastrike``) and
   a second client certificate from the same CA that is pinned for nobody.
2. Two daemons, each with its own SoftHSM token, socket and state: the
   producer's holds ``acme/telemetry``, the gateway's ``acme/feedback``.
3. Key exchange: each side's public key is fetched from its daemon
   (``/v1/kids/{kid}``) and registered on the other daemon as a trusted peer
   key of tenant ``acme`` (``POST /v1/trusted-keys``).
4. The flow: the producer signs telemetry, the gateway verifies it through
   its signerd, signs feedback, the producer verifies the feedback by kid.
5. Refusals: a replayed request (409), a tampered body (401), a wrong
   service certificate (401), a wrong tenant (403), a wrong schema (422).

Each outcome is printed; the exit status is 1 when any expectation fails.
Everything started here is stopped before it returns.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from signerd.client import AsyncClient
from signerd.errors import SignerdError
from signerd.gateway import Producer, client_context, server_context

from . import daemons, gateway
from .certs import CertificateAuthority

TENANT = "acme"
TELEMETRY_KEY = "acme/telemetry"
IDENTITY = "spectrastrike"
ATTESTATION = "sha256:" + "5e" * 32


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)

    def expect(self, what: str, got: str, wanted: str) -> None:
        ok = got == wanted
        print(
            f"{'ok  ' if ok else 'FAIL'}  {what:<50} {got}"
            + ("" if ok else f" (expected {wanted})")
        )
        if not ok:
            self.failures.append(what)


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    tls: ssl.SSLContext,
    headers: dict[str, str],
    body: bytes,
) -> tuple[int, bytes]:
    async with session.post(url, data=body, headers=headers, ssl=tls) as resp:
        return resp.status, await resp.read()


def _outcome(status: int, raw: bytes) -> str:
    if status == 200:
        return "200"
    try:
        return f"{status} {json.loads(raw)['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return f"{status} (no error envelope)"


async def _refused(coro: Any) -> str:
    try:
        await coro
    except SignerdError as exc:
        return f"{exc.status} {exc.code}"
    return "accepted"


async def exchange_keys(producer: AsyncClient, gateway_signer: AsyncClient) -> None:
    """Trust each side's active public key on the other side's signerd, for tenant acme."""
    for source, key, target in (
        (producer, TELEMETRY_KEY, gateway_signer),
        (gateway_signer, gateway.FEEDBACK_KEY, producer),
    ):
        kid = (await source.get_key(key)).active_kid
        assert kid is not None
        info = await source.kid_info(kid)
        await target.trust_key(TENANT, kid, info.jwk)
        print(f"      trusted {kid} ({key}) on the other side's signerd")


async def scenario(work: Path, report: Report) -> None:
    pki = CertificateAuthority(work / "pki")
    server_cert = pki.issue_server()
    mine = pki.issue_client("spectrastrike", IDENTITY)
    rogue = pki.issue_client("rogue", IDENTITY)  # same CA, same name, not pinned
    started: list[daemons.Daemon] = []
    try:
        started.append(daemons.start("producer", work / "producer", [TELEMETRY_KEY]))
        started.append(daemons.start("gateway", work / "gateway", [gateway.FEEDBACK_KEY]))
        producer_d, gateway_d = started
        print(f"      producer signerd at {producer_d.socket_path}")
        print(f"      gateway signerd at {gateway_d.socket_path}")
        async with (
            AsyncClient(producer_d.socket_path) as psigner,
            AsyncClient(gateway_d.socket_path) as gsigner,
            aiohttp.ClientSession() as session,
        ):
            await exchange_keys(psigner, gsigner)
            app = gateway.application(gsigner, {IDENTITY: [mine.fingerprint]}, ATTESTATION)
            tls = server_context(str(server_cert.cert), str(server_cert.key), str(pki.cert_path))
            runner, port = await gateway.serve(app, tls)
            try:
                url = f"https://127.0.0.1:{port}/v1/ingest"
                print(f"      gateway on {url} (mTLS, {IDENTITY} pinned)")
                ours = client_context(str(pki.cert_path), str(mine.cert), str(mine.key))
                theirs = client_context(str(pki.cert_path), str(rogue.cert), str(rogue.key))
                await _flows(
                    Producer(psigner, TELEMETRY_KEY), psigner, session, url, ours, theirs, report
                )
            finally:
                await runner.cleanup()
    finally:
        for d in reversed(started):
            d.stop()


async def _flows(
    producer: Producer,
    psigner: AsyncClient,
    session: aiohttp.ClientSession,
    url: str,
    ours: ssl.SSLContext,
    theirs: ssl.SSLContext,
    report: Report,
) -> None:
    def telemetry(n: int) -> bytes:
        doc = {"event": "scan.finished", "seq": n, "attestation_measurement_hash": ATTESTATION}
        return json.dumps(doc).encode()

    me = {"X-Service-Identity": IDENTITY}

    # 1. the whole flow
    body = telemetry(1)
    headers = {**me, **await producer.sign_telemetry(body)}
    status, raw = await _post(session, url, ours, headers, body)
    report.expect("signed telemetry -> gateway", _outcome(status, raw), "200")
    verified = "no feedback"
    if status == 200:
        fb = await producer.verify_feedback(
            raw, schema=gateway.FEEDBACK_SCHEMA, attestation=ATTESTATION
        )
        verified = f"verified {fb.kid}"
        print(f"      feedback {json.dumps(fb.data, sort_keys=True)}")
    report.expect("feedback verified by kid at the producer", verified, "verified acme.feedback.v1")

    # 2. the same request again
    status, raw = await _post(session, url, ours, headers, body)
    report.expect("replayed request", _outcome(status, raw), "409 replayed_nonce")

    # 3. a body changed after signing
    body = telemetry(3)
    headers = {**me, **await producer.sign_telemetry(body)}
    status, raw = await _post(session, url, ours, headers, body.replace(b'"seq": 3', b'"seq": 4'))
    report.expect("tampered body", _outcome(status, raw), "401 invalid_signature")
    status, raw = await _post(session, url, ours, headers, body)
    report.expect("... its genuine body, same nonce, still accepted", _outcome(status, raw), "200")

    # 4. a certificate of the same CA that is not pinned for the identity
    body = telemetry(4)
    headers = {**me, **await producer.sign_telemetry(body)}
    status, raw = await _post(session, url, theirs, headers, body)
    report.expect(
        "wrong service certificate", _outcome(status, raw), "401 invalid_client_certificate"
    )

    # 5. telemetry declared for another tenant than its key's
    body = telemetry(5)
    headers = {**me, **await producer.sign_telemetry(body), "X-Signerd-Tenant": "globex"}
    status, raw = await _post(session, url, ours, headers, body)
    report.expect("wrong tenant", _outcome(status, raw), "403 tenant_mismatch")

    # 6. feedback checked against another schema than the one it was signed for
    body = telemetry(6)
    headers = {**me, **await producer.sign_telemetry(body)}
    status, raw = await _post(session, url, ours, headers, body)
    report.expect("telemetry for the schema check", _outcome(status, raw), "200")
    envelope = json.loads(raw) if status == 200 else {}
    got = await _refused(producer.verify_feedback(raw, schema="vectorvue.feedback.v2"))
    report.expect("wrong schema (producer, local)", got, "422 schema_mismatch")
    got = await _refused(psigner.feedback_verify(envelope, "vectorvue.feedback.v2"))
    report.expect("wrong schema (producer's signerd)", got, "422 schema_mismatch")
    got = await _refused(psigner.feedback_verify(envelope, gateway.FEEDBACK_SCHEMA))
    report.expect("... right schema at the producer's signerd", got, "accepted")


async def _bounded(work: Path, report: Report, timeout: float) -> None:
    """The scenario within ``timeout``; SIGTERM cancels it, and its finally stops the daemons."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    await asyncio.wait_for(scenario(work, report), timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.federation", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary one)"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up after this many seconds"
    )
    args = parser.parse_args(argv)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="signerd-federation-"))
    report = Report()
    started = time.monotonic()
    try:
        asyncio.run(_bounded(work, report, args.timeout))
    except Exception as exc:  # the run itself broke: say so, fail
        print(f"FAIL  the example could not run: {type(exc).__name__}: {exc}", file=sys.stderr)
        report.failures.append("run")
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("FAIL  interrupted", file=sys.stderr)
        report.failures.append("interrupted")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - started
    if report.failures:
        print(
            f"{len(report.failures)} expectation(s) failed ({took:.1f}s): {', '.join(report.failures)}"
        )
        return 1
    print(f"all expectations met ({took:.1f}s)")
    return 0
