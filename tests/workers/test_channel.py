"""A worker's channel to its supervisor, over a real SOCK_SEQPACKET pair."""

from __future__ import annotations

import asyncio
import socket

import pytest

from signerd.workers import WorkerChannel
from signerd.workers._channel import valid_message

pytestmark = pytest.mark.timeout(30)


def _pair() -> tuple[WorkerChannel, socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return WorkerChannel(1, theirs, config=None), mine


async def test_messages_arrive_in_order_to_iterators_and_callbacks() -> None:
    """Each notification reaches every iterator and callback; the iterator ends when the supervisor goes."""
    channel, supervisor = _pair()
    seen: list[str] = []
    channel.on_message(seen.append)

    async def collect() -> list[str]:
        return [text async for text in channel.messages()]

    task = asyncio.create_task(collect())
    await asyncio.sleep(0)
    for text in ("keyring-changed acme/a", "keyring-changed acme/b"):
        supervisor.send(b"M" + text.encode())
    await asyncio.sleep(0.05)
    supervisor.close()
    got = await asyncio.wait_for(task, 5)
    assert got == seen == ["keyring-changed acme/a", "keyring-changed acme/b"]
    assert channel.closed
    channel.close()


async def test_malformed_packets_are_dropped_not_delivered() -> None:
    """A packet of another kind, non-ASCII or over-long text is ignored; later ones still arrive."""
    channel, supervisor = _pair()
    seen: list[str] = []
    channel.on_message(seen.append)
    for packet in (b"X", b"M", b"M\xff\xfe", b"M" + b"a" * 257, b"M bad", b"Mok"):
        supervisor.send(packet)
    await asyncio.sleep(0.05)
    assert seen == ["ok"]
    channel.close()
    supervisor.close()


def test_send_ready_and_heartbeat_frame_their_packets() -> None:
    """ready() sends R once, send() sends M+text, and invalid text is refused before sending."""
    channel, supervisor = _pair()
    channel.ready()
    channel.ready()
    assert channel.send("keyring-changed acme/feedback")
    with pytest.raises(ValueError):
        channel.send("two\nlines")
    supervisor.setblocking(False)
    packets = []
    while True:
        try:
            packets.append(supervisor.recv(1000))
        except BlockingIOError:
            break
    assert packets == [b"R", b"Mkeyring-changed acme/feedback"]
    channel.close()
    supervisor.close()


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("keyring-changed acme/feedback", True),
        ("x", True),
        ("a" * 256, True),
        ("a" * 257, False),
        ("", False),
        (" lead", False),
        ("trail ", False),
        ("tab\there", False),
        ("é", False),
    ],
)
def test_valid_message(text: str, ok: bool) -> None:
    """Notifications are 1-256 printable ASCII characters without surrounding blanks."""
    assert valid_message(text) is ok
