"""The served OpenAPI document is what the server does: schemathesis --checks all finds nothing.

A real daemon on its own SoftHSM token; a small asyncio forwarder bridges
loopback TCP (127.0.0.1, an ephemeral port) to the daemon's Unix socket, and
schemathesis runs every check (status codes, schemas, headers such as 405
Allow, positive and negative data, unsupported methods) in its coverage,
fuzzing and stateful phases, the last following the document's links
(create -> rotate -> sign -> verify, staged rotation -> promote, retire ->
destroy -> cancel-deletion).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ..conftest import ROOT, SOFTHSM_MODULE, policy_allow_all, start_daemon
from ..support.rawhttp import request

MIN_REQUESTS = 5000
MAX_EXAMPLES = 150  # per operation: about 3,400 requests in coverage and fuzzing
STATEFUL_SECONDS = 120  # stateful scenarios repeat for this long: 1,600-2,200 requests
LABEL = "signerd-openapi"

# Cross-field equalities JSON Schema cannot express, so a schema-valid request
# may be a 400 on these operations only:
# - destroy: confirm must equal the kid the path names (400 confirmation_required);
# - addTrustedKey: the JWK's optional kid member must equal the request's kid
#   (400 invalid_request);
# - verifyFeedback: the expected schema must equal the envelope's (422 schema_mismatch;
#   the stateful phase varies the one a link supplies).
# And one across requests: on the admin operations, an Idempotency-Key the caller
# used for another request is 422 idempotency_key_reused.
_STATUSES = {
    "destroyVersion": '["2xx", "400", "401", "403", "404", "409", "422", "429"]',
    "addTrustedKey": '["2xx", "400", "401", "403", "404", "409", "422", "429"]',
    "verifyFeedback": '["2xx", "401", "403", "404", "409", "422", "429"]',
    **{
        op: '["2xx", "401", "403", "404", "409", "422", "429"]'
        for op in [
            "createKey",
            "rotateKey",
            "promoteVersion",
            "retireVersion",
            "cancelDeletion",
            "retireTrustedKey",
        ]
    },
}
CONFIG = """
[generation]
database = "none"

[phases.stateful]
max-steps = 8
""" + "".join(
    f"""
[[operations]]
include-operation-id = "{op}"
checks.positive_data_acceptance.expected-statuses = {statuses}
"""
    for op, statuses in _STATUSES.items()
)


class Bridge:
    """Loopback TCP on an ephemeral port, each connection forwarded to a Unix socket."""

    def __init__(self, unix_path: str) -> None:
        self.unix_path = unix_path
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            except OSError:
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        finally:
            writer.close()
            self._tasks.discard(task)

    def __enter__(self) -> Bridge:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("bridge did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.sleep(0)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A daemon on a token of its own (fuzzing creates many keys), bridged to loopback TCP."""
    base = tmp_path_factory.mktemp("openapi")
    token_dir = base / "softhsm"
    made = subprocess.run(
        [str(ROOT / "softhsm" / "make-token.sh"), str(token_dir), LABEL],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    conf = made.stdout.strip().split("=", 1)[1]
    backend = {
        "type": "pkcs11",
        "module": SOFTHSM_MODULE,
        "token_label": LABEL,
        "pin_file": str(token_dir / "pin"),
    }
    saved = os.environ["SOFTHSM2_CONF"]
    os.environ["SOFTHSM2_CONF"] = conf  # for the daemon only; this process keeps its token
    try:
        # the fuzzer makes refusals and made-up key names by the thousand: throttling them
        # (429 with Retry-After, which schemathesis waits out; one shared keyring re-read a
        # second for unknown names, about 1 s per 404) would make the run's length about
        # the throttles, which tests/server/test_amplification and keys/test_unknown_names pin
        policy = {**policy_allow_all(), "refusal_rate": 1e6, "refusal_burst": 1_000_000}
        daemon = start_daemon(
            base / "d",
            backends={"hsm": backend},
            policy=policy,
            keys={"unknown_kid_refresh": 0.0},
        )
    finally:
        os.environ["SOFTHSM2_CONF"] = saved
    try:
        with Bridge(str(daemon.socket_path)) as bridge:
            yield base, daemon, bridge
    finally:
        assert daemon.stop() == 0, daemon.log_text()[-4000:]


def test_bridge_reaches_the_daemon(served: Any) -> None:
    """The loopback bridge answers what the Unix socket answers."""
    _, daemon, bridge = served
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", bridge.port, timeout=10)
    try:
        conn.request("GET", "/v1/openapi.json")
        over_tcp = conn.getresponse().read()
    finally:
        conn.close()
    assert over_tcp == request(str(daemon.socket_path), "GET", "/v1/openapi.json").body
    assert json.loads(over_tcp)["openapi"].startswith("3.1")


def _step(interaction: dict[str, Any]) -> str:
    """`METHOD /route STATUS` of one recorded request, with path parameters blanked."""
    req = interaction["request"]
    path = re.sub(r"^https?://[^/]+", "", req["uri"]).split("?")[0]
    path = re.sub(r"^/v1/keys/[^/]+/[^/]+", "/v1/keys/T/N", path)
    path = re.sub(r"/versions/[^/]+/", "/versions/V/", path)
    status = (interaction.get("response") or {}).get("status_code")
    return f"{req['method']} {path} {status}"


def _interactions(ndjson: Path) -> tuple[Counter[str], list[list[str]]]:
    """Requests per phase, and the stateful phase's chains of requests."""
    per_phase: Counter[str] = Counter()
    chains: list[list[str]] = []
    for line in ndjson.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        interactions = finished.get("recorder", {}).get("interactions", {})
        per_phase[finished["phase"]] += len(interactions)
        if finished["phase"] != "stateful":
            continue
        cases = finished["recorder"].get("cases", {})
        for case_id in cases:
            chain: list[str] = []
            current: str | None = case_id
            while current is not None and current in interactions:
                chain.append(_step(interactions[current]))
                current = cases.get(current, {}).get("parent_id")
            chains.append(list(reversed(chain)))
    return per_phase, chains


def _schemathesis(work: Path, port: int, name: str, *options: str) -> tuple[Any, Path, str]:
    """Run schemathesis --checks all with ``options``; its JSON summary, events and output."""
    exe = shutil.which("schemathesis", path=os.path.dirname(sys.executable))
    assert exe, "schemathesis is a test dependency (pip install -e '.[test]')"
    report, events = work / f"{name}.json", work / f"{name}.ndjson"
    argv = [
        exe,
        "run",
        f"http://127.0.0.1:{port}/v1/openapi.json",
        "--checks",
        "all",
        "--workers",
        "1",
        "--seed",
        "20261123",
        "--request-timeout",
        "30",
        "--report",
        "json,ndjson",
        f"--report-json-path={report}",
        f"--report-ndjson-path={events}",
        *options,
    ]
    run = subprocess.run(argv, cwd=work, capture_output=True, text=True, timeout=400)
    output = run.stdout[-12000:] + run.stderr[-4000:]
    summary = json.loads(report.read_text())
    assert run.returncode == 0, output
    assert summary["failures"] == [] and summary["errors"] == [], output
    assert summary["test_cases"]["with_failures"] == 0, output
    return summary, events, output


@pytest.mark.timeout(600)
def test_schemathesis_finds_nothing(served: Any) -> None:
    """schemathesis --checks all, >= 5,000 requests in all phases with stateful links through the
    key lifecycle and both envelopes, finds nothing."""
    base, _, bridge = served
    work = base / "schemathesis"
    work.mkdir()
    (work / "schemathesis.toml").write_text(CONFIG)
    # examples, coverage and fuzzing: a fixed number of cases per operation
    summary, events, output = _schemathesis(
        work,
        bridge.port,
        "fuzz",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        str(MAX_EXAMPLES),
    )
    assert summary["phases"]["coverage"]["status"] == "success", output
    assert summary["phases"]["fuzzing"]["status"] == "success", output
    fuzzed, _ = _interactions(events)
    # stateful: scenarios following the document's links, repeated for a time budget
    summary, events, output = _schemathesis(
        work, bridge.port, "stateful", "--phases", "stateful", "--max-time", str(STATEFUL_SECONDS)
    )
    assert summary["phases"]["stateful"]["status"] == "success", output
    stateful, chains = _interactions(events)

    assert fuzzed["coverage"] > 0 and fuzzed["fuzzing"] > 0 and stateful["stateful"] > 0
    total = sum(fuzzed.values()) + sum(stateful.values())
    assert total >= MIN_REQUESTS, (fuzzed, stateful)
    # the links were followed from a created key onwards, through admin operations
    followed = {" -> ".join(c) for c in chains if len(c) >= 2}
    assert any(c.startswith("POST /v1/keys 201 -> ") for c in followed), sorted(followed)
    assert any(
        re.search(r"POST /v1/keys 201 -> POST /v1/keys/T/N/(rotate|versions/V/\w+) 200", c)
        for c in followed
    ), sorted(followed)
    # and through both envelopes, from a created key: sign, then verify what was signed
    for kind in ("telemetry", "feedback"):
        assert any(
            f"POST /v1/{kind}/sign 200 -> POST /v1/{kind}/verify 200" in c for c in followed
        ), sorted(followed)
