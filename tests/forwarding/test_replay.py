"""The forwarder against a collector that resets the connection (closes with bytes it
acknowledged still unread): those records are sent again; against one that closes
cleanly: nothing is sent twice. The collector here is a loopback socket of the test's
(rsyslogd cannot be made to reset on purpose)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from pathlib import Path

import pytest

from signerd.forwarding import Forwarder, forwarding_settings, parse
from signerd.testing import wait_until

pytestmark = pytest.mark.timeout(60)


def trail(path: Path, first: int, last: int) -> None:
    """Append records ``first``..``last`` to a trail file (what the forwarder reads)."""
    with open(path, "ab") as handle:
        for seq in range(first, last + 1):
            record = {"seq": seq, "record_id": f"b-{seq}", "prev": "0" * 64, "status": 200}
            handle.write(json.dumps(record, sort_keys=True).encode() + b"\n")


def frames(data: bytes) -> list[int]:
    """The seqs of the octet-counted messages in ``data`` (whole ones)."""
    seqs = []
    while b" " in data:
        length, rest = data.split(b" ", 1)
        if len(rest) < int(length):
            break
        message = parse(rest[: int(length)])
        assert message is not None
        seqs.append(int(message.params["seq"]))
        data = rest[int(length) :]
    return seqs


def read_all(conn: socket.socket, want: int) -> bytes:
    data = b""
    while len(frames(data)) < want:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("reset", [True, False])
def test_records_acknowledged_before_a_reset_are_sent_again(tmp_path: Path, reset: bool) -> None:
    """After a reset, the records the collector acknowledged within the replay window come
    again on the next connection (then the rest, in order); after a clean close, the
    next connection starts right after the last record acknowledged."""
    path = tmp_path / "audit.jsonl"
    trail(path, 1, 20)
    server = socket.create_server(("127.0.0.1", 0))
    settings = forwarding_settings(
        {"host": "127.0.0.1", "port": server.getsockname()[1], "checkpoint_key": "a/b"},
        str(path),
    )
    assert settings is not None
    chains = {"audit.jsonl": (str(path), "w0")}
    # a window wider than the default second: a loaded machine cannot stall past it
    forwarder = Forwarder(settings, chains, None, None, replay_window=60.0)
    runner = threading.Thread(target=forwarder.run, daemon=True)
    runner.start()
    try:
        first, _ = server.accept()
        got = frames(read_all(first, 20))
        assert got == list(range(1, 21))
        wait_until(lambda: forwarder.chains["audit.jsonl"].tail.pos.seq == 20, what="acks")
        if reset:  # SO_LINGER 0: close sends RST
            first.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        first.close()
        trail(path, 21, 25)
        second, _ = server.accept()
        again = frames(read_all(second, 25 if reset else 5))
        second.close()
    finally:
        forwarder.stopping.set()
        runner.join(10)
        server.close()
    assert again == (list(range(1, 26)) if reset else list(range(21, 26)))
