"""GET /metrics against a real two-worker signerd (SoftHSM): names and labels, that a
request moves the right series, the sum over the workers, the cap on key series, the policy."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.testing import ALL_OPERATIONS

from ..cli.test_cli import run_ctl
from ..conftest import DaemonProcess, daemon_config, start_daemon, to_toml, unique, wait_until
from ..support.federation import Api, b64, federation_daemon
from ..support.openbao import dev_server, vault_backend_config
from ..support.rawhttp import request
from .scrape import Samples, get, label_values, scrape, sign, status, value

pytestmark = pytest.mark.timeout(240)

MAX_KEY_SERIES = 3
OK_SIGN = {"operation": "sign", "outcome": "ok", "code": "none"}


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    daemon = start_daemon(
        tmp_path_factory.mktemp("metrics"),
        server={"workers": 2},
        # tenant "0mt" sorts before every other test key on the shared token: under the
        # series cap (the first keys by name) it keeps its series
        keys={"bootstrap": ["0mt/a"], "max_active_age": {"0mt/*": 1e9}},
        metrics={"max_key_series": MAX_KEY_SERIES},
    )
    yield daemon
    assert daemon.stop() == 0, daemon.log_text()


def _signs(samples: Samples) -> float:
    return value(samples, "signerd_requests_total", **OK_SIGN)


def test_series_names_and_labels(d: DaemonProcess) -> None:
    """Every documented family is there with exactly its labels; latency buckets start at 100 µs."""
    assert sign(d, "0mt/a").status == 200
    text, samples = scrape(d)
    labels: dict[str, set[str]] = {}
    for name, pairs in samples:
        labels.setdefault(name, set()).update(k for k, _ in pairs)
    expected = {
        "signerd_requests_total": {"operation", "outcome", "code"},
        "signerd_request_duration_seconds_bucket": {"operation", "backend", "le"},
        "signerd_sign_queued_seconds_bucket": {"backend", "le"},
        "signerd_sign_backend_seconds_bucket": {"backend", "le"},
        "signerd_sign_batch_size_bucket": {"backend", "le"},
        "signerd_audit_write_seconds_bucket": {"le"},
        "signerd_audit_queue_depth": set(),
        "signerd_audit_healthy": set(),
        "signerd_backend_up": {"backend"},
        "signerd_key_active_created_timestamp_seconds": {"key"},
        "signerd_key_versions": {"key", "state"},
        "signerd_key_rotation_due_timestamp_seconds": {"key"},
        "signerd_key_rotation_overdue": {"key"},
        "signerd_metrics_keys_omitted": set(),
        "signerd_start_time_seconds": set(),
        "signerd_build_info": {"version"},
        "signerd_worker_restarts": {"worker"},
    }
    for name, names in expected.items():
        assert labels.get(name) == names, (name, labels.get(name))
    buckets = label_values(samples, "signerd_request_duration_seconds_bucket", "le")
    assert min(float(b) for b in buckets) == 0.0001
    assert value(samples, "signerd_backend_up", backend="hsm") == 1.0
    assert value(samples, "signerd_audit_healthy") == 1.0
    assert value(samples, "signerd_key_versions", key="0mt/a", state="active") == 1.0
    assert value(samples, "signerd_key_rotation_overdue", key="0mt/a") == 0.0
    created = value(samples, "signerd_key_active_created_timestamp_seconds", key="0mt/a")
    assert (
        value(samples, "signerd_key_rotation_due_timestamp_seconds", key="0mt/a") == created + 1e9
    )
    assert label_values(samples, "signerd_worker_restarts", "worker") == {"0", "1"}
    assert "# TYPE signerd_requests_total counter" in text


def test_a_sign_moves_its_series(d: DaemonProcess) -> None:
    """Five signs add five ok signs, five sign latencies on hsm, five batched items and five
    audit writes; a sign of an unknown key adds one refused unknown_key; scrapes count as
    metrics, never as sign."""
    _, before = scrape(d)
    for i in range(5):
        assert sign(d, "0mt/a", f"m{i}".encode()).status == 200
    assert sign(d, f"0mt/{unique('gone')}").code == "unknown_key"
    _, after = scrape(d)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("signerd_requests_total", **OK_SIGN) == 5
    refused = {"operation": "sign", "outcome": "refused", "code": "unknown_key"}
    assert delta("signerd_requests_total", **refused) == 1
    assert delta("signerd_request_duration_seconds_count", operation="sign", backend="hsm") == 6
    assert delta("signerd_sign_batch_size_sum", backend="hsm") == 5
    assert delta("signerd_sign_backend_seconds_count", backend="hsm") >= 1
    assert delta("signerd_sign_queued_seconds_count", backend="hsm") >= 1
    assert delta("signerd_audit_write_seconds_count") == 5
    scrapes = {"operation": "metrics", "outcome": "ok", "code": "none"}
    assert delta("signerd_requests_total", **scrapes) >= 1


def _answered_by(d: DaemonProcess, operation: str) -> list[int]:
    """How many records of ``operation`` each worker's audit file holds."""
    marker = f'"operation":"{operation}"'.encode()
    return [p.read_bytes().count(marker) for p in d.audit_files()]


def test_counts_are_summed_over_workers_and_survive_a_restart(d: DaemonProcess) -> None:
    """Signs answered by both workers are counted once each, whichever worker answers the
    scrape; a worker killed with SIGKILL and restarted keeps its counts in the sum."""
    base = _signs(scrape(d)[1])
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: sign(d, "0mt/a", f"w{i}".encode()), range(64)))
    assert all(r.status == 200 for r in replies)
    assert all(n > 0 for n in _answered_by(d, "sign")), "both workers signed"

    seen: list[float] = []

    def scraped_by_both() -> bool:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            seen.extend(pool.map(lambda _: _signs(scrape(d)[1]), range(16)))
        return all(n > 0 for n in _answered_by(d, "metrics"))

    wait_until(scraped_by_both, timeout=60, what="scrapes answered by both workers")
    assert set(seen) == {base + 64}

    victim = min(d.worker_pids())
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        workers = status(d)["workers"]
        return victim not in {w["pid"] for w in workers} and any(
            w["restarts"] == 1 for w in workers
        )

    wait_until(restarted, timeout=60, what="the killed worker restarted")
    _, samples = scrape(d)
    directory = d.socket_path.parent / ".signerd-metrics"
    assert list(directory.glob(f"counter_{victim}.db")), "the dead worker's counts are kept"
    assert not list(directory.glob(f"gauge_live*_{victim}.db")), "its live gauges are dropped"
    assert _signs(samples) == base + 64
    restarts = label_values(samples, "signerd_worker_restarts", "worker")
    assert sum(value(samples, "signerd_worker_restarts", worker=w) for w in restarts) == 1


def test_key_series_are_capped_and_callers_make_no_series(d: DaemonProcess) -> None:
    """At most metrics.max_key_series keys have series (the rest are counted); names a caller
    sends for keys that do not exist appear nowhere, and add one series per code at most."""
    tenant = unique("cap")
    for i in range(4):
        reply = request(str(d.socket_path), "POST", "/v1/keys", {"key": f"{tenant}/k{i}"})
        assert reply.status == 201, reply.body
    _, before = scrape(d)
    names = [f"{tenant}/nosuch{i}" for i in range(20)]
    for name in names:
        assert sign(d, name).status == 404
    text, samples = scrape(d)
    total = status(d)["keys_total"]
    assert total >= 5
    keyed = label_values(samples, "signerd_key_versions", "key")
    assert len(keyed) == MAX_KEY_SERIES
    assert value(samples, "signerd_metrics_keys_omitted") == total - MAX_KEY_SERIES
    due = label_values(samples, "signerd_key_rotation_due_timestamp_seconds", "key")
    assert due <= {"0mt/a"}, "only keys a max_active_age pattern matches have a due date"
    assert not any(name.split("/")[1] in text for name in names)
    series = {k for k in samples if k[0] == "signerd_requests_total"}
    grown = series - {k for k in before if k[0] == "signerd_requests_total"}
    assert len(grown) <= 1  # at most the first refused unknown_key sign


def test_metrics_and_status_need_their_grant(tmp_path: Path) -> None:
    """Without a metrics or status grant both answer 403; granting metrics (SIGHUP) opens
    /metrics and still refuses /v1/status."""
    others = [op for op in ALL_OPERATIONS if op not in ("metrics", "status")]
    rule = {"name": "ops", "uids": [os.getuid()], "tenants": ["*"], "operations": others}
    daemon = start_daemon(tmp_path / "p", server={"workers": 2}, policy={"rules": [rule]})
    try:
        assert get(daemon, "/metrics").code == "permission_denied"
        assert get(daemon, "/v1/status").code == "permission_denied"
        refused = run_ctl("--socket", str(daemon.socket_path), "status")
        assert refused.returncode == os.EX_NOPERM and b"permission_denied" in refused.stderr
        granted = {**rule, "operations": [*others, "metrics"]}
        doc = daemon_config(tmp_path / "p", server={"workers": 2}, policy={"rules": [granted]})
        daemon.config_path.write_text(to_toml(doc))
        daemon.sighup()
        wait_until(
            lambda: all(get(daemon, "/metrics").status == 200 for _ in range(6)),
            timeout=30,
            what="the metrics grant reloaded in every worker",
        )
        assert get(daemon, "/v1/status").code == "permission_denied"
    finally:
        daemon.stop()


def test_metrics_can_be_turned_off(tmp_path: Path) -> None:
    """metrics.enabled = false: /metrics answers 404, /v1/status is still served."""
    daemon = start_daemon(tmp_path / "off", server={"workers": 1}, metrics={"enabled": False})
    try:
        assert get(daemon, "/metrics").code == "not_found"
        assert status(daemon)["status"] == "healthy"
    finally:
        daemon.stop()


def test_nonce_store_size_and_refusals(tmp_path: Path) -> None:
    """An accepted envelope adds a nonce to the store's count; its replay adds one refusal."""
    fed = federation_daemon(tmp_path / "fed", server={"workers": 2})
    try:
        api = Api(fed)
        tenant = unique("nm")
        api.ok("POST", "/v1/keys", {"key": f"{tenant}/telemetry"}, status=201)
        body = b64(b'{"cpu": 1}')
        signed = api.ok("POST", "/v1/telemetry/sign", {"key": f"{tenant}/telemetry", "body": body})
        _, before = scrape(fed)
        assert value(before, "signerd_nonce_store_entries") == 0
        req = {"tenant": tenant, "body": body, **signed}
        assert api("POST", "/v1/telemetry/verify", req).status == 200
        assert api("POST", "/v1/telemetry/verify", req).code == "replayed_nonce"
        _, after = scrape(fed)
        assert value(after, "signerd_nonce_store_entries") == 1
        assert value(after, "signerd_nonce_refusals_total", reason="replayed") == 1
        assert status(fed)["nonces"] == {"store": "sqlite", "entries": 1}
    finally:
        fed.stop()


def test_series_of_a_previous_run_are_removed_at_start(tmp_path: Path) -> None:
    """Files left in the series directory by an earlier run are gone once the daemon serves."""
    stale = tmp_path / "s" / "run" / ".signerd-metrics" / "counter_1.db"
    stale.parent.mkdir(parents=True, mode=0o750)
    stale.parent.parent.chmod(0o750)
    stale.write_bytes(b"left over")
    daemon = start_daemon(tmp_path / "s", server={"workers": 2})
    try:
        assert not stale.exists()
        assert scrape(daemon)[1]
    finally:
        daemon.stop()


def test_a_single_process_daemon_serves_the_same_series(tmp_path: Path) -> None:
    """server.workers = 1 (no supervisor): a sign is counted, the one worker slot is listed."""
    daemon = start_daemon(tmp_path / "one", server={"workers": 1}, keys={"bootstrap": ["one/k"]})
    try:
        assert sign(daemon, "one/k").status == 200
        _, samples = scrape(daemon)
        assert value(samples, "signerd_requests_total", **OK_SIGN) == 1
        assert value(samples, "signerd_sign_batch_size_count", backend="hsm") == 1
        assert label_values(samples, "signerd_worker_restarts", "worker") == {"0"}
        assert [w["pid"] for w in status(daemon)["workers"]] == [daemon.pid]
    finally:
        daemon.stop()


def test_each_backend_is_counted_and_checked(tmp_path: Path) -> None:
    """Signs on a SoftHSM tenant and an OpenBao tenant land under their own backend label;
    with OpenBao stopped, signerd_backend_up{backend="bao"} is 0 and the status degraded."""
    with dev_server(tmp_path / "bao") as bao:
        daemon = start_daemon(
            tmp_path / "two",
            server={"workers": 2},
            keys={"bootstrap": ["vt/k", "ht/k"]},
            backends={"bao": vault_backend_config(bao)},
            tenants={"vt": {"backend": "bao"}},
        )
        try:
            for key, n in (("vt/k", 3), ("ht/k", 2)):
                for i in range(n):
                    assert sign(daemon, key, f"b{i}".encode()).status == 200
            _, samples = scrape(daemon)
        except BaseException:
            daemon.stop()
            raise
    try:
        for backend, n in (("bao", 3), ("hsm", 2)):
            count = "signerd_request_duration_seconds_count"
            assert value(samples, count, operation="sign", backend=backend) == n
            assert value(samples, "signerd_sign_batch_size_sum", backend=backend) == n
            assert value(samples, "signerd_backend_up", backend=backend) == 1.0
        _, down = scrape(daemon)
        assert value(down, "signerd_backend_up", backend="bao") == 0.0
        assert value(down, "signerd_backend_up", backend="hsm") == 1.0
        doc = status(daemon)
        assert doc["status"] == "degraded"
        (bao_state,) = [b for b in doc["backends"] if b["name"] == "bao"]
        assert bao_state["type"] == "vault" and not bao_state["up"] and bao_state["code"]
        assert run_ctl("--socket", str(daemon.socket_path), "status").returncode == 1
    finally:
        daemon.stop()
