"""The RELP client on its own: frames read and refused, and a session against a loopback
collector of the test's that answers, refuses and goes away on purpose."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from signerd.forwarding import (
    RelpCollector,
    RelpError,
    RelpReader,
    forwarding_settings,
    relp_frame,
)

pytestmark = pytest.mark.timeout(60)

GOOD: dict[str, Any] = {"host": "127.0.0.1", "port": 2514, "checkpoint_key": "audit/cp"}


def test_frames_are_read_whole_across_pieces() -> None:
    """A reader gives each frame once all of it came, however the bytes were split, an
    empty frame included."""
    data = relp_frame(1, b"rsp", b"200 OK\nrelp_version=0\ncommands=syslog") + b"5 rsp 0\n"
    data += b"0 serverclose 0\n"
    reader = RelpReader()
    got = []
    for byte in data:
        reader.feed(bytes([byte]))
        while (frame := reader.take()) is not None:
            got.append(frame)
    assert got == [
        (1, b"rsp", b"200 OK\nrelp_version=0\ncommands=syslog"),
        (5, b"rsp", b""),
        (0, b"serverclose", b""),
    ]
    assert relp_frame(7, b"syslog", b"<110>1 x") == b"7 syslog 8 <110>1 x\n"
    assert relp_frame(8, b"close") == b"8 close 0\n"


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 400 Bad Request\r\n",
        b"1 rsp 6 200 OKX",  # no trailer after the data
        b"1 rsp 0 \n",
        b"1 rsp 99999999 ",  # longer than an answer can be
        b"1" * 70,
        b"-1 rsp 0\n",
    ],
)
def test_what_is_not_a_frame_is_refused(data: bytes) -> None:
    """Bytes that cannot be a RELP frame (or an answer too long) are a RelpError, not a
    wait for more."""
    reader = RelpReader()
    reader.feed(data)
    with pytest.raises(RelpError):
        reader.take()


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"transport": "udp"}, "forwarding.transport"),
        ({"transport": "relp", "tls": True}, "forwarding.tls_cert_file"),
        ({"tls": True, "tls_cert_file": "/c.pem"}, "both or neither"),
        ({"tls_cert_file": "/c.pem", "tls_key_file": "/k.pem"}, "needs tls = true"),
    ],
)
def test_bad_transport_settings_name_their_key(change: dict[str, Any], names: str) -> None:
    """A transport other than tcp or relp, RELP over TLS without this host's certificate,
    a certificate without its key or without TLS: each a ValueError naming the key."""
    with pytest.raises(ValueError, match=names):
        forwarding_settings({**GOOD, **change}, "/x/audit.jsonl")
    s = forwarding_settings({**GOOD, "transport": "relp"}, "/x/audit.jsonl")
    assert s is not None and (s.transport, s.tls) == ("relp", False)


class Peer:
    """A loopback RELP collector run by a script: for each session, what it answers."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sessions: list[list[tuple[int, bytes, bytes]]] = []

    def serve(self, script: list[str]) -> threading.Thread:
        """One session: answer open, then for each syslog frame the next word of
        ``script`` ("ok", "refuse", "serverclose"); "serverclose" ends the session."""

        def run() -> None:
            conn, _ = self.server.accept()
            got: list[tuple[int, bytes, bytes]] = []
            self.sessions.append(got)
            reader = RelpReader()
            words = iter(script)
            with conn:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    reader.feed(data)
                    while (frame := reader.take()) is not None:
                        got.append(frame)
                        txnr, command, _ = frame
                        if command == b"open":
                            conn.sendall(relp_frame(txnr, b"rsp", b"200 OK\ncommands=syslog"))
                            continue
                        if command == b"close":
                            conn.sendall(relp_frame(txnr, b"rsp"))
                            return
                        word = next(words, "silent")
                        if word == "ok":
                            conn.sendall(relp_frame(txnr, b"rsp", b"200 OK"))
                        elif word == "refuse":
                            conn.sendall(relp_frame(txnr, b"rsp", b"500 queue full"))
                        elif word == "serverclose":
                            conn.sendall(relp_frame(0, b"serverclose"))
                            return

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.server.close()


def collector_for(peer: Peer) -> RelpCollector:
    settings = forwarding_settings(
        {**GOOD, "port": peer.port, "transport": "relp", "timeout": 5}, "/x/audit.jsonl"
    )
    assert settings is not None
    return RelpCollector(settings, threading.Event())


def test_only_answered_messages_count_and_the_rest_go_again_in_a_new_session(
    peer: Peer,
) -> None:
    """A message counts only once the collector answered it 200; after an error answer
    (or serverclose) the unanswered ones are sent again in a new session, whose
    transaction numbers start over after its open."""
    messages = [f"m{i}".encode() for i in range(5)]
    first = peer.serve(["ok", "ok", "refuse", "ok", "ok"])
    relp = collector_for(peer)
    assert relp.connected()
    assert relp.send(messages) == (2, False)
    first.join(10)
    assert relp.sock is None  # the session ended with the refusal
    second = peer.serve(["ok", "serverclose"])
    assert relp.connected()
    assert relp.send(messages[2:]) == (1, False)
    second.join(10)
    third = peer.serve(["ok", "ok"])
    assert relp.connected()
    assert relp.send(messages[3:]) == (2, False)
    relp.disconnect()
    third.join(10)
    opened = [s[0] for s in peer.sessions]
    assert all(txnr == 1 and command == b"open" for txnr, command, _ in opened)
    assert b"commands=syslog" in opened[0][2] and b"relp_software=signerd," in opened[0][2]
    syslog = [[(t, d) for t, c, d in s if c == b"syslog"] for s in peer.sessions]
    assert syslog[1][0] == (2, b"m2")  # the refused one first, numbered from 2 again
    assert [d for _, d in syslog[2]] == [b"m3", b"m4"]
    assert peer.sessions[2][-1][1] == b"close"
