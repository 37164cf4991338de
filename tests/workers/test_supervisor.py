"""The pre-fork supervisor with a trivial echo worker (tests/support/workers_echo.py), as a real process."""

from __future__ import annotations

import functools
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from signerd.testing import wait_until

from ..support import workers_echo

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)


@dataclass
class Echo:
    proc: subprocess.Popen[bytes]
    dir: Path

    @property
    def sock(self) -> str:
        return str(self.dir / "echo.sock")

    def ask(self, line: str, timeout: float = 5.0) -> str:
        return self.talk([line], timeout)[0]

    def talk(self, lines: list[str], timeout: float = 5.0) -> list[str]:
        """Send each line on one connection (so to one worker), collecting each answer."""
        answers = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(self.sock)
            for line in lines:
                s.sendall(line.encode() + b"\n")
                answer = b""
                while not answer.endswith(b"\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                answers.append(answer.decode().strip())
        return answers

    def pids(self, kind: str = "ready") -> set[int]:
        return {int(p.name.split("-")[1]) for p in self.dir.glob(f"{kind}-*")}

    def live_workers(self) -> set[int]:
        return {p for p in self.pids("start") if _alive(p)}

    def log(self) -> str:
        return (self.dir / "supervisor.log").read_text(errors="replace")[-3000:]


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _start(tmp: Path, workers: int, mode: str = "ok", wait_ready: bool = True) -> Echo:
    log = (tmp / "supervisor.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.workers_echo", str(tmp), str(workers), mode],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    echo = Echo(proc, tmp)
    if wait_ready:
        wait_until(
            lambda: len(echo.pids()) >= workers or proc.poll() is not None, 10, interval=0.02
        )
        assert proc.poll() is None, echo.log()
    return echo


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Echo]]:
    started: list[Echo] = []

    def run(workers: int, mode: str = "ok", wait_ready: bool = True) -> Echo:
        echo = _start(tmp_path, workers, mode, wait_ready)
        started.append(echo)
        return echo

    yield run
    for echo in started:
        if echo.proc.poll() is None:
            echo.proc.kill()
            echo.proc.wait(timeout=10)
        for pid in echo.pids("start"):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _serving_pids(echo: Echo, want: set[int], tries: int = 400) -> set[int]:
    """The worker pids that answered, connecting until all of ``want`` did."""
    seen: set[int] = set()
    for _ in range(tries):
        seen.add(int(echo.ask("who").split()[0]))
        if want <= seen:
            break
    return seen


def test_every_worker_serves_the_inherited_socket(start: Callable[..., Echo]) -> None:
    """N workers start, each answers on the one listening socket, with slots 0..N-1."""
    echo = start(3)
    assert echo.ask("hello") == "hello"
    ready = echo.pids()
    assert len(ready) == 3 and len(echo.live_workers()) == 3
    assert _serving_pids(echo, ready) == ready
    slots = {(echo.dir / f"start-{p}").read_text().split()[1] for p in ready}
    assert slots == {"0", "1", "2"}
    assert (echo.dir / "supervisor-ready").exists()


def test_workers_initialise_one_after_another(start: Callable[..., Echo]) -> None:
    """A worker is forked only after the previous one reported initialised."""
    echo = start(3)
    times = sorted(
        (float((echo.dir / f"start-{p}").read_text().split()[0]), p) for p in echo.pids()
    )
    for (_, before), (started, _) in itertools.pairwise(times):
        ready_at = float((echo.dir / f"ready-{before}").read_text().split()[0])
        assert started >= ready_at


def test_the_next_worker_starts_while_the_previous_reads_its_keys(
    start: Callable[..., Echo],
) -> None:
    """A worker that said "initialised" reads its keys while the next one starts: each is forked after the previous one's "initialised" and before its "ready"; the supervisor is ready once all are."""
    echo = start(3, "keys")
    wait_until(lambda: (echo.dir / "supervisor-ready").exists(), 10, interval=0.02)

    def at(kind: str, pid: int) -> float:
        return float((echo.dir / f"{kind}-{pid}").read_text().split()[0])

    times = sorted((at("start", p), p) for p in echo.pids())
    assert len(times) == 3
    for (_, before), (started, _) in itertools.pairwise(times):
        assert at("init", before) <= started < at("ready", before)
    last_ready = max(at("ready", p) for _, p in times)
    first_start = times[0][0]
    keys = workers_echo.KEYS_SECONDS
    assert last_ready - first_start < 3 * keys, (last_ready - first_start, keys)


def test_a_worker_that_never_reads_its_keys_is_killed_and_counted(
    start: Callable[..., Echo],
) -> None:
    """start_timeout (1 s) holds after "initialised" too: a worker never ready is killed; three in a row make the supervisor exit non-zero."""
    echo = start(2, "hangkeys", wait_ready=False)
    code = echo.proc.wait(timeout=30)
    assert code != 0
    slots = [(echo.dir / f"start-{p}").read_text().split()[1] for p in echo.pids("start")]
    assert max(slots.count("0"), slots.count("1")) == 3
    assert "signerd.worker_start_timeout" in echo.log()
    assert not echo.live_workers()


def test_a_killed_worker_is_restarted_and_serving_goes_on(start: Callable[..., Echo]) -> None:
    """SIGKILL of a worker: the other keeps answering, a new worker takes the dead one's slot."""
    echo = start(2)
    first = echo.pids()
    victim = min(first)
    slot = (echo.dir / f"start-{victim}").read_text().split()[1]
    os.kill(victim, signal.SIGKILL)
    for _ in range(20):  # served throughout by the survivor or the replacement
        assert echo.ask("ping") == "ping"
    wait_until(lambda: len(echo.pids() - first) == 1, 10, interval=0.02)
    (new,) = echo.pids() - first
    assert (echo.dir / f"start-{new}").read_text().split()[1] == slot
    assert not _alive(victim)
    assert echo.live_workers() == (first - {victim}) | {new}
    assert _serving_pids(echo, {new}) >= {new}


def test_a_worker_killed_soon_after_each_start_is_always_restarted(
    start: Callable[..., Echo],
) -> None:
    """A worker that was up, killed within min_uptime more often than start_limit, is restarted."""
    echo = start(2)
    for _ in range(5):  # start_limit is 3
        before = echo.pids()
        victim = min(before & echo.live_workers())
        os.kill(victim, signal.SIGKILL)
        replaced = functools.partial(lambda b: len(echo.pids() - b) == 1, before)
        wait_until(replaced, 10, "a new worker", interval=0.02)
        assert echo.proc.poll() is None, echo.log()
    assert "signerd.worker_start_limit" not in echo.log()
    assert len(echo.live_workers()) == 2
    assert echo.ask("ping") == "ping"


def test_sighup_reaches_every_worker_and_restarts_get_the_new_config(
    start: Callable[..., Echo],
) -> None:
    """SIGHUP to the supervisor: each worker gets SIGHUP once; a later worker forks with the reloaded config."""
    echo = start(3)
    workers = echo.pids()
    echo.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: echo.pids("hup") >= workers, 10, interval=0.02)
    time.sleep(0.2)
    assert echo.pids("hup") == workers
    assert all((echo.dir / f"hup-{p}").read_text().count("\n") == 1 for p in workers)
    assert echo.proc.poll() is None
    os.kill(min(workers), signal.SIGKILL)
    wait_until(lambda: echo.pids() - workers, 10, interval=0.02)
    (new,) = echo.pids() - workers
    assert (echo.dir / f"start-{new}").read_text().split()[2] == "1"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_stops_every_worker_and_exits_zero(
    start: Callable[..., Echo], signum: signal.Signals
) -> None:
    """SIGTERM or SIGINT: every worker stops gracefully, the supervisor exits 0, nothing is left."""
    echo = start(3)
    workers = echo.live_workers()
    echo.proc.send_signal(signum)
    assert echo.proc.wait(timeout=5) == 0
    assert not any(_alive(p) for p in workers)
    assert not os.path.exists(f"/proc/{echo.proc.pid}")


def test_a_worker_ignoring_sigterm_is_killed_at_the_deadline(start: Callable[..., Echo]) -> None:
    """A worker that ignores SIGTERM is SIGKILLed after graceful_timeout (1 s); nothing is left."""
    echo = start(2, "stubborn")
    workers = echo.live_workers()
    asked = time.monotonic()
    echo.proc.send_signal(signal.SIGTERM)
    assert echo.proc.wait(timeout=10) == 0
    took = time.monotonic() - asked
    assert 0.9 <= took < 4.0, took
    assert not any(_alive(p) for p in workers)


def test_a_worker_that_never_starts_makes_the_supervisor_give_up(
    start: Callable[..., Echo],
) -> None:
    """A worker failing before initialised is retried with backoff, then the supervisor exits with its status."""
    echo = start(2, "fail", wait_ready=False)
    assert echo.proc.wait(timeout=20) == 3, echo.log()
    slots = [(echo.dir / f"start-{p}").read_text().split()[1] for p in echo.pids("start")]
    assert max(slots.count("0"), slots.count("1")) == 3  # start_limit = 3 failures in one slot
    assert not echo.live_workers()
    assert "signerd.worker_start_limit" in echo.log()


def test_a_configuration_error_in_a_worker_stops_at_once(start: Callable[..., Echo]) -> None:
    """A worker exiting EX_CONFIG before initialised is not retried: the supervisor exits 78."""
    echo = start(2, "config", wait_ready=False)
    assert echo.proc.wait(timeout=20) == os.EX_CONFIG
    assert len(echo.pids("start")) == 1


def test_a_worker_that_hangs_in_start_is_killed_and_counted(start: Callable[..., Echo]) -> None:
    """A worker silent past start_timeout (1 s) is killed; three in a row make the supervisor exit non-zero."""
    echo = start(2, "hang", wait_ready=False)
    code = echo.proc.wait(timeout=30)
    assert code != 0
    slots = [(echo.dir / f"start-{p}").read_text().split()[1] for p in echo.pids("start")]
    assert max(slots.count("0"), slots.count("1")) == 3
    assert not echo.live_workers()


def test_a_notification_reaches_every_other_worker(start: Callable[..., Echo]) -> None:
    """A worker's message goes to each other worker (not back to the sender) at once."""
    echo = start(3)
    who, sent = echo.talk(["who", "notify keyring-changed acme/feedback"])
    sender = int(who.split()[0])
    assert sent == "sent"
    others = echo.pids() - {sender}

    def got(pid: int) -> str:  # a file being written may be there and still empty
        path = echo.dir / f"msg-{pid}"
        return path.read_text() if path.exists() else ""

    wait_until(lambda: all(got(p).endswith("\n") for p in others), 2, interval=0.02)
    for pid in others:
        assert got(pid) == "keyring-changed acme/feedback\n"
    time.sleep(0.1)
    assert sender not in echo.pids("msg")


def test_workers_die_with_the_supervisor(start: Callable[..., Echo]) -> None:
    """SIGKILL of the supervisor: the kernel sends each worker SIGTERM (PR_SET_PDEATHSIG)."""
    echo = start(2)
    workers = echo.live_workers()
    echo.proc.kill()
    echo.proc.wait(timeout=5)
    wait_until(lambda: not any(_alive(p) for p in workers), 5, interval=0.02)


def test_a_worker_whose_loop_is_stuck_is_killed_and_replaced(start: Callable[..., Echo]) -> None:
    """A worker whose event loop stops turning (no heartbeat for 1 s) is SIGKILLed and restarted."""
    echo = start(2)
    first = echo.pids()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(echo.sock)
        s.sendall(b"who\n")
        frozen = int(s.recv(100).split()[0])
        s.sendall(b"freeze\n")
        wait_until(lambda: not _alive(frozen), 5, interval=0.02)
        assert s.recv(100) == b""  # killed, never answered
    wait_until(lambda: len(echo.pids() - first) == 1, 5, interval=0.02)
    assert "signerd.worker_unresponsive" in echo.log()
    assert echo.ask("ping") == "ping"


def test_workers_share_the_supervisors_rate_limit_table(start: Callable[..., Echo]) -> None:
    """A bucket of burst 5 gives 5 tokens in all, whichever workers the takes land on."""
    echo = start(2)
    answers: dict[int, list[str]] = {}
    for _ in range(400):
        who, took = echo.talk(["who", "take"])
        answers.setdefault(int(who.split()[0]), []).append(took)
        if len(answers) == 2 and sum(len(a) for a in answers.values()) >= 20:
            break
    assert len(answers) == 2, answers.keys()
    assert sum(a.count("yes") for a in answers.values()) == 5
