"""A supervisor with a trivial worker, for tests/workers/test_supervisor.py.

    python -m tests.support.workers_echo DIR WORKERS MODE

The workers serve a line protocol on DIR/echo.sock, inherited from the
supervisor: ``who`` answers "PID INDEX", ``notify TEXT`` sends TEXT to the
other workers, anything else is echoed. Each worker records what happens to
it as files in DIR (``start-PID``, ``ready-PID``, ``hup-PID``, ``msg-PID``),
and the supervisor writes ``supervisor-ready`` once a worker is up.

MODE: ``ok``; ``fail`` (exit 3 before initialised); ``config`` (exit 78, EX_CONFIG,
before initialised); ``hang`` (never initialised); ``stubborn`` (ignores SIGTERM);
``keys`` (says "initialised", writes ``init-PID``, then takes KEYS_SECONDS to be
ready); ``hangkeys`` (says "initialised", then is never ready).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from signerd.workers import Supervisor, SupervisorTiming, WorkerChannel

INIT_SECONDS = 0.15
KEYS_SECONDS = 0.5  # "reading the keys", after "initialised"


@dataclass(frozen=True)
class EchoConfig:
    workers: int
    generation: int = 0


def _note(directory: Path, name: str, text: str = "") -> None:
    with open(directory / name, "a") as fh:
        fh.write(text + "\n")


def make_worker(directory: Path, mode: str):  # type: ignore[no-untyped-def]
    def worker_main(index: int, listen: socket.socket, channel: WorkerChannel) -> int:
        pid = os.getpid()
        generation = getattr(channel.config, "generation", 0)
        _note(directory, f"start-{pid}", f"{time.monotonic()} {index} {generation}")
        if mode == "fail":
            return 3
        if mode == "config":
            return os.EX_CONFIG
        time.sleep(INIT_SECONDS)  # "initialising the token"
        if mode == "hang":
            time.sleep(3600)
        if mode in ("keys", "hangkeys"):
            _note(directory, f"init-{pid}", f"{time.monotonic()} {index}")
            channel.initialised()
            time.sleep(3600 if mode == "hangkeys" else KEYS_SECONDS)
        _note(directory, f"ready-{pid}", f"{time.monotonic()} {index}")
        return asyncio.run(serve(directory, mode, index, listen, channel))

    return worker_main


async def serve(
    directory: Path, mode: str, index: int, listen: socket.socket, channel: WorkerChannel
) -> int:
    pid = os.getpid()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if mode != "stubborn":
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: _note(directory, f"hup-{pid}", str(getattr(channel.config, "generation", 0))),
    )
    channel.on_message(lambda text: _note(directory, f"msg-{pid}", text))

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                text = line.decode().strip()
                if text == "who":
                    answer = f"{pid} {index}"
                elif text == "freeze":  # a token call that never returns, in the loop
                    time.sleep(3600)
                    answer = "thawed"
                elif text == "take":  # one token of a bucket every worker shares
                    assert channel.buckets is not None
                    took = channel.buckets.take(("echo", 0, None), 0.001, 5, time.monotonic())
                    answer = "yes" if took else "no"
                elif text.startswith("notify "):
                    answer = "sent" if channel.send(text[7:]) else "dropped"
                else:
                    answer = text
                writer.write(answer.encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, sock=listen)
    channel.ready()
    channel.heartbeat(0.1)
    await stop.wait()
    server.close()
    return 0


def main() -> int:
    directory, workers, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listen.bind(str(directory / "echo.sock"))
    listen.listen(128)
    timing = SupervisorTiming(
        start_timeout=1.0,
        graceful_timeout=1.0,
        min_uptime=0.5,
        backoff_initial=0.05,
        backoff_max=0.2,
        start_limit=3,
        heartbeat_timeout=1.0,
    )
    supervisor = Supervisor(
        EchoConfig(workers),
        listen,
        make_worker(directory, mode),
        timing=timing,
        reload_config=lambda c: EchoConfig(c.workers, c.generation + 1),
        on_ready=lambda: _note(directory, "supervisor-ready"),
    )
    _note(directory, "supervisor-pid", str(os.getpid()))
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
