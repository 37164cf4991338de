"""Two signerd hosts on a real three-node OpenBao raft cluster: shared keys, failover.

The cluster (three ``bao server`` processes on loopback, raft storage) is
booted once for the module; its boot time is printed. The test that kills the
leader starts the killed node again before it returns.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.backends.vault import from_config, parse_settings
from signerd.errors import BackendUnavailable
from signerd.wire import KeyName

from ..conftest import unique, wait_until
from ..support.cluster import (
    Load,
    b64,
    check_signatures,
    host_token,
    public_keys,
    sign,
    start_host,
    transit_name,
    version_of,
)
from ..support.federation import assert_replays_across, redis_server
from ..support.openbao import RaftCluster, free_port_pair, raft_cluster, vault_backend_config
from ..support.rawhttp import request

#: seconds after the new leader is seen within which a host must sign again
FOLLOW_SLACK = 3.0
#: answers to an admin call that a retry with the same Idempotency-Key settles
_RETRY = ("backend_unavailable", "outcome_unknown")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RaftCluster]:
    with raft_cluster(tmp_path_factory.mktemp("raft")) as booted:
        print(f"\n[cluster] three-node raft cluster booted in {booted.boot_seconds:.1f} s")
        yield booted


def _key() -> str:
    return f"{unique('cl')}/k"


@pytest.mark.timeout(120)
def test_cluster_is_three_raft_voters_with_one_leader(cluster: RaftCluster) -> None:
    """The harness's cluster is three raft voters, one active and two standbys, each its own data dir."""
    servers = cluster.api("GET", "sys/storage/raft/configuration")["data"]["config"]["servers"]
    assert sorted(s["node_id"] for s in servers) == ["node1", "node2", "node3"]
    assert all(s["voter"] for s in servers)
    assert sorted(n.health() or 0 for n in cluster.nodes) == [200, 429, 429]
    assert len({n.workdir / "data" for n in cluster.nodes}) == 3
    for node in cluster.nodes:
        config = (node.workdir / "bao.hcl").read_text()
        assert 'storage "raft"' in config and "retry_join" in config
        assert "performance_multiplier = 1" in config


@pytest.mark.timeout(120)
def test_host_token_signs_and_reads_but_cannot_delete(cluster: RaftCluster) -> None:
    """A host's token (the documented policy) creates, rotates and signs, but cannot delete or trim."""
    token = host_token(cluster)
    leader = cluster.leader()
    name = transit_name(_key())
    leader.api("POST", f"transit/keys/{name}", {"type": "ed25519"}, token=token)
    leader.api("POST", f"transit/keys/{name}/rotate", {}, token=token)
    leader.api("POST", f"transit/sign/{name}", {"input": "eA=="}, token=token)
    leader.api("POST", f"transit/keys/{name}/config", {"deletion_allowed": True}, token=token)
    leader.api("DELETE", f"transit/keys/{name}", token=token, ok=(403,))
    leader.api(
        "POST", f"transit/keys/{name}/trim", {"min_available_version": 2}, token=token, ok=(403,)
    )
    leader.api("GET", "transit/export/signing-key/" + name, token=token, ok=(403, 400))
    assert leader.transit_key(name)["latest_version"] == 2


@pytest.mark.timeout(180)
def test_rotation_through_one_host_reaches_the_other(cluster: RaftCluster, tmp_path: Path) -> None:
    """A rotate through host A: A signs with the new version at once, B within its refresh
    interval, and B verifies the new kid at once (an unknown kid is looked up)."""
    a = start_host(tmp_path / "a", cluster, refresh_interval=1.0)
    b = start_host(tmp_path / "b", cluster, refresh_interval=1.0)
    try:
        key = _key()
        assert request(str(a.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        wait_until(lambda: sign("b", str(b.socket_path), key, b"x").status == 200, timeout=10)
        looked_up = 0.0
        for expected in (2, 3, 4):
            # an unknown kid of a known key is looked up at most once per
            # keys.unknown_kid_refresh (1 s) per key: space the lookups by that bound
            time.sleep(max(0.0, looked_up + 1.05 - time.monotonic()))
            rotated = request(str(a.socket_path), "POST", f"/v1/keys/{key}/rotate", {})
            assert rotated.status == 200, rotated.body
            assert version_of(rotated.json["kid"]) == expected
            at_a = sign("a", str(a.socket_path), key, b"after rotate")
            assert at_a.status == 200 and at_a.kid is not None
            assert version_of(at_a.kid) == expected  # never the old version as active
            assert at_a.signature is not None
            verified = request(
                str(b.socket_path),
                "POST",
                "/v1/verify",
                {"kid": at_a.kid, "data": "YWZ0ZXIgcm90YXRl", "signature": b64(at_a.signature)},
            )
            looked_up = time.monotonic()
            assert verified.status == 200, verified.body
            began = time.monotonic()
            wait_until(
                lambda v=expected: (
                    version_of(sign("b", str(b.socket_path), key, b"y").kid or "x.v0")  # type: ignore[misc]
                    == v
                ),
                timeout=1.0 + 5.0,  # refresh interval, plus a loaded machine's delay
            )
            print(
                f"[cluster] host B signed with v{expected} {time.monotonic() - began:.2f} s after A rotated"
            )
        check_signatures([sign("b", str(b.socket_path), key, b"z")], public_keys(cluster, key))
    finally:
        assert a.stop() == 0, a.log_text()[-2000:]
        assert b.stop() == 0, b.log_text()[-2000:]


@pytest.mark.timeout(180)
def test_stopping_one_host_does_not_disturb_the_other(cluster: RaftCluster, tmp_path: Path) -> None:
    """Host A stopped (SIGTERM) and started again while B signs steadily: B has no error."""
    a = start_host(tmp_path / "a", cluster)
    b = start_host(tmp_path / "b", cluster)
    key = _key()
    try:
        assert request(str(a.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        wait_until(lambda: sign("b", str(b.socket_path), key, b"x").status == 200, timeout=10)
        load = Load({"b": b}, key).start()
        time.sleep(1.0)  # let the load run before and after the stop (not synchronisation)
        assert a.stop() == 0, a.log_text()[-2000:]
        a = start_host(tmp_path / "a2", cluster)
        time.sleep(1.0)
        answers = load.stop()
        assert Counter(x.status for x in answers) == {200: len(answers)}, Counter(
            (x.status, x.code) for x in answers
        )
        assert len(answers) > 20
        check_signatures(answers, public_keys(cluster, key))
    finally:
        a.stop()
        b.stop()


@pytest.mark.timeout(300)
def test_leader_kill_9_under_load_from_two_hosts(cluster: RaftCluster, tmp_path: Path) -> None:
    """Leader killed -9 while two hosts sign: only 503 backend_unavailable with Retry-After,
    and only inside the election window; every kid verifies; a rotate made meanwhile makes one
    version, used by both hosts afterwards."""
    a = start_host(tmp_path / "a", cluster)
    b = start_host(tmp_path / "b", cluster)
    key = _key()
    killed = None
    load: Load | None = None
    try:
        sock_a = str(a.socket_path)
        assert request(sock_a, "POST", "/v1/keys", {"key": key}).status == 201
        wait_until(lambda: sign("b", str(b.socket_path), key, b"x").status == 200, timeout=10)
        load = Load({"a": a, "b": b}, key).start()
        wait_until(lambda: len(load.answers) >= 60, timeout=30)
        earlier = next(x for x in load.answers if x.status == 200)
        killed_at = time.monotonic()
        killed = cluster.kill_leader()
        for host in (a, b):  # verify needs no backend: known kids verify meanwhile
            assert earlier.signature is not None
            body = {
                "kid": earlier.kid,
                "data": b64(earlier.data),
                "signature": b64(earlier.signature),
            }
            verified = request(str(host.socket_path), "POST", "/v1/verify", body)
            assert verified.status == 200, verified.body
        new_leader = cluster.leader(timeout=60)
        elected_at = time.monotonic()
        # a rotate through A, retried with one Idempotency-Key until it is answered (an admin
        # call the election interrupts may be outcome_unknown): exactly one new version
        once = {"Idempotency-Key": "rotate-" + key.replace("/", ".")}
        rotated = request(sock_a, "POST", f"/v1/keys/{key}/rotate", {}, headers=once)
        while rotated.code in _RETRY and time.monotonic() < elected_at + 30:
            time.sleep(0.2)
            rotated = request(sock_a, "POST", f"/v1/keys/{key}/rotate", {}, headers=once)
        assert rotated.status == 200, rotated.body
        rotated_at = time.monotonic()
        assert version_of(rotated.json["kid"]) == 2
        # steady load after the election and the rotate (refresh interval 1 s), a second past
        # FOLLOW_SLACK: a rotate answered at once after the election leaves answers to check
        time.sleep(FOLLOW_SLACK + 1.0)
        answers = load.stop()
        for host in (a, b):  # no kid lost: both versions published by both hosts
            jwks = request(str(host.socket_path), "GET", "/v1/jwks").json
            kids = {k["kid"] for k in jwks["keys"]}
            tenant, name = key.split("/")
            assert {f"{tenant}.{name}.v1", f"{tenant}.{name}.v2"} <= kids, kids
    finally:
        if load is not None:
            load.stop()
        a_rc, b_rc = a.stop(), b.stop()
        if killed is not None:
            cluster.restart(killed)
            cluster.wait_voters(3)
    assert (a_rc, b_rc) == (0, 0), a.log_text()[-3000:] + b.log_text()[-3000:]
    assert new_leader is not killed

    failures = [x for x in answers if x.status != 200]
    for x in failures:
        assert (x.status, x.code, x.retry_after) == (503, "backend_unavailable", "1"), x
        assert killed_at <= x.ended <= elected_at + FOLLOW_SLACK, (
            x.ended - killed_at,
            elected_at - killed_at,
        )
    keys = public_keys(cluster, key)
    assert sorted(keys) == [1, 2]  # no duplicate version
    check_signatures(answers, keys)  # never a wrong kid
    for x in answers:
        if x.status == 200 and x.host == "a" and x.started > rotated_at:
            assert version_of(x.kid or "") == 2
        if x.status == 200 and x.started > rotated_at + 1.0 + FOLLOW_SLACK:
            assert version_of(x.kid or "") == 2, x
    for name in ("a", "b"):
        after = [x for x in answers if x.host == name and x.started > elected_at + FOLLOW_SLACK]
        assert after and all(x.status == 200 for x in after), name
    window = elected_at - killed_at
    outage = max((x.ended for x in failures), default=killed_at) - killed_at
    duration = answers[-1].ended - answers[0].started
    ok = sum(1 for x in answers if x.status == 200)
    latency = statistics.median(x.ended - x.started for x in answers if x.status == 200)
    print(
        f"\n[cluster] election window {window:.2f} s (kill -9 to new leader); hosts answered 503 "
        f"for {outage:.2f} s ({len(failures)} of {len(answers)} requests); two hosts signed "
        f"{ok / duration:.0f}/s paced, p50 {latency * 1000:.1f} ms"
    )


@pytest.mark.parametrize(
    ("addr", "message"),
    [
        ([], "a list of 1 to 16"),
        (["http://127.0.0.1:1"] * 2, "listed twice"),
        (["http://127.0.0.1:1", "https://127.0.0.1:2"], "same scheme"),
        ([f"http://127.0.0.1:{p}" for p in range(1, 18)], "a list of 1 to 16"),
        (["http://127.0.0.1:1", 5], "must be a string"),
        (["http://127.0.0.1:1/v1"], "http(s)://host[:port]"),
        ({"a": "http://127.0.0.1:1"}, "a URL or a list"),
    ],
)
def test_bad_address_lists_are_refused(cluster: RaftCluster, addr: object, message: str) -> None:
    """A bad ``addr`` list (empty, duplicate, mixed schemes, too long, not URLs) is a ValueError on addr."""
    cfg = vault_backend_config(cluster.nodes[0], addr=addr)
    with pytest.raises(ValueError, match=r"^addr: ") as caught:
        parse_settings(cfg)
    assert message in str(caught.value)


@pytest.mark.timeout(120)
def test_backend_fails_over_in_order_to_the_active_node(cluster: RaftCluster) -> None:
    """Listed as [dead, standby, standby, active]: the first request goes to the active node,
    counted as one failover; the standbys are never used."""
    leader = cluster.leader()
    dead = f"http://127.0.0.1:{free_port_pair()}"
    order = [dead, *(n.addr for n in cluster.standbys()), leader.addr]
    backend = from_config(vault_backend_config(leader, addr=order))
    try:
        assert (backend.node, backend.failovers) == (dead, 0)
        key = KeyName(unique("fo"), "k")
        backend.create(key)
        assert (backend.node, backend.failovers) == (leader.addr, 1)
        info = backend.rotate(key, pending=False)
        assert [s.value for s in (v.state for v in info.versions)] == ["verify-only", "active"]
        assert len(backend.sign(key, 2, [b"a", b"b"])) == 2
        assert backend.failovers == 1
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_no_reachable_node_is_backend_unavailable_and_probes_are_bounded(
    cluster: RaftCluster,
) -> None:
    """Every listed node unreachable: BackendUnavailable at once, the nodes probed at most once
    per 100 ms whatever the request rate, and no node switch counted."""
    dead = [f"http://127.0.0.1:{free_port_pair()}" for _ in range(3)]
    backend = from_config(vault_backend_config(cluster.nodes[0], addr=dead))
    probes: list[str] = []
    real_probe = backend.nodes.probe

    def counting_probe(addr: str) -> int | None:
        probes.append(addr)
        return real_probe(addr)

    backend.nodes.probe = counting_probe  # type: ignore[method-assign]
    try:
        began = time.monotonic()
        for _ in range(200):
            with pytest.raises(BackendUnavailable):
                backend.sign(KeyName("t", "k"), 1, [b"x"])
        scans = (time.monotonic() - began) / 0.1 + 2  # one scan per 100 ms, and the first check
        assert len(probes) <= 3 * scans, (len(probes), scans)
        assert len(probes) < 200  # far fewer probes than requests
        assert backend.failovers == 0
    finally:
        backend.close()


@pytest.mark.timeout(120)
def test_a_lagging_standby_is_never_used_for_a_sign_after_a_rotate(cluster: RaftCluster) -> None:
    """With a standby listed first, a sign right after each rotate uses the new version: the
    backend checks the node is active before its first request and signs only there."""
    leader = cluster.leader()
    standby = cluster.standbys()[0]
    backend = from_config(vault_backend_config(leader, addr=[standby.addr, leader.addr]))
    try:
        key = KeyName(unique("st"), "k")
        backend.create(key)
        for expected in range(2, 12):
            info = backend.rotate(key, pending=False)
            active = info.active
            assert active is not None and active.version == expected
            (signature,) = backend.sign(key, active.version, [b"x"])
            assert isinstance(signature, bytes), signature
        assert backend.node == leader.addr
    finally:
        backend.close()


@pytest.mark.timeout(120)
def test_a_sign_refused_by_a_lagging_standby_is_signed_on_the_active_node(
    cluster: RaftCluster,
) -> None:
    """A backend left on a standby (its periodic check not due) that refuses a new version as
    unknown checks the node, fails over to the active one and signs there: no error returned."""
    leader = cluster.leader()
    standby = cluster.standbys()[0]
    admin = from_config(vault_backend_config(leader, addr=leader.addr))
    lagging = from_config(
        vault_backend_config(leader, addr=[standby.addr, leader.addr], health_interval=3600)
    )
    lagging.nodes._checked = time.monotonic()  # as if it had just found the standby active
    try:
        key = KeyName(unique("lg"), "k")
        admin.create(key)
        rotate = f"transit/keys/signerd-{key.tenant}.{key.name}/rotate"
        for version in range(2, 22):
            # transit's own rotate, without signerd's record writes around it: the sign
            # follows at once, while the standby may not have the version yet
            leader.api("POST", rotate)
            (signature,) = lagging.sign(key, version, [b"x"])
            assert isinstance(signature, bytes), signature
            if lagging.failovers:
                break
        assert (lagging.node, lagging.failovers) == (leader.addr, 1)
    finally:
        admin.close()
        lagging.close()


@pytest.mark.timeout(180)
def test_a_standby_killed_under_load_disturbs_nothing(cluster: RaftCluster, tmp_path: Path) -> None:
    """A standby killed -9 while two hosts sign: no request fails; it rejoins when started again."""
    a = start_host(tmp_path / "a", cluster)
    b = start_host(tmp_path / "b", cluster)
    key = _key()
    killed = None
    load: Load | None = None
    try:
        assert request(str(a.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        wait_until(lambda: sign("b", str(b.socket_path), key, b"x").status == 200, timeout=10)
        load = Load({"a": a, "b": b}, key).start()
        wait_until(lambda: len(load.answers) >= 40, timeout=30)
        killed = cluster.standbys()[0]
        killed.kill()
        count = len(load.answers)
        wait_until(lambda: len(load.answers) >= count + 100, timeout=60)
        answers = load.stop()
    finally:
        if load is not None:
            load.stop()
        a_rc, b_rc = a.stop(), b.stop()
        if killed is not None:
            cluster.restart(killed)
            cluster.wait_voters(3)
    assert (a_rc, b_rc) == (0, 0)
    assert Counter((x.status, x.code) for x in answers) == {(200, None): len(answers)}
    check_signatures(answers, public_keys(cluster, key))


@pytest.mark.parametrize("interval", [0, 0.01, 4000, "1", True])
def test_bad_health_interval_is_refused(cluster: RaftCluster, interval: object) -> None:
    """``health_interval`` outside [0.1, 3600] seconds, or not a number, is a ValueError naming it."""
    cfg = vault_backend_config(cluster.nodes[0], addr=cluster.addrs, health_interval=interval)
    with pytest.raises(ValueError, match=r"^health_interval: "):
        parse_settings(cfg)


@pytest.mark.timeout(180)
def test_two_hosts_on_the_cluster_share_one_redis_for_nonces(
    cluster: RaftCluster, tmp_path: Path
) -> None:
    """Two hosts on the cluster sharing one redis-server: an envelope accepted through one is
    refused as a replay through the other."""
    with redis_server(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "always") as r:
        nonces = {"store": "redis", "url": r.url, "prefix": f"signerd:{unique('cn')}:"}
        a = start_host(tmp_path / "a", cluster, federation={"nonces": nonces})
        b = start_host(tmp_path / "b", cluster, federation={"nonces": nonces})
        try:
            assert_replays_across(a, b, unique("cf"), "p-cluster", rounds=10)
        finally:
            assert a.stop() == 0, a.log_text()[-2000:]
            assert b.stop() == 0, b.log_text()[-2000:]
