"""The event loop signerd runs on: uvloop when installed (``server.event_loop = "auto"``),
asyncio's own when asked for or when uvloop is missing."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from signerd.daemon._loop import loop_factory

from ..conftest import start_daemon
from ..support.rawhttp import request


def _maps_uvloop(pid: int) -> bool:
    return "uvloop" in Path(f"/proc/{pid}/maps").read_text()


def test_auto_falls_back_to_asyncio_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` gives asyncio's loop when uvloop cannot be imported; ``uvloop`` then fails."""
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop: ImportError
    assert loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ImportError):
        loop_factory("uvloop")


def test_auto_takes_uvloop_and_asyncio_is_asyncio() -> None:
    """With uvloop installed, ``auto`` makes uvloop loops; ``asyncio`` makes asyncio's."""
    import uvloop

    loop = loop_factory("auto")()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    loop = loop_factory("asyncio")()
    try:
        assert type(loop).__module__.startswith("asyncio")
    finally:
        loop.close()


@pytest.mark.parametrize("choice", ["auto", "asyncio"])
def test_workers_run_on_the_configured_loop(tmp_path: Path, choice: str) -> None:
    """Every worker serves signs on uvloop with ``auto`` and never loads it with ``asyncio``."""
    d = start_daemon(tmp_path / "d", server={"workers": 2, "event_loop": choice})
    try:
        sock = str(d.socket_path)
        assert request(sock, "POST", "/v1/keys", {"key": f"loop{choice[:2]}/k"}).status == 201
        reply = request(sock, "POST", "/v1/sign", {"key": f"loop{choice[:2]}/k", "data": "aGk="})
        assert reply.status == 200, reply.body
        workers = d.worker_pids()
        assert len(workers) == 2
        assert {_maps_uvloop(pid) for pid in workers} == {choice == "auto"}
    finally:
        assert d.stop() == 0


def test_uvloop_required_but_missing_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``server.event_loop = "uvloop"`` without uvloop installed is a ConfigError naming the key."""
    from signerd._config import ConfigError, parse

    from ..conftest import daemon_config

    monkeypatch.setitem(sys.modules, "uvloop", None)
    doc = daemon_config(Path("/tmp/unused"), server={"event_loop": "uvloop"})
    with pytest.raises(ConfigError, match=r"^server\.event_loop: uvloop is not installed"):
        parse(doc)
