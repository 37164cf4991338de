"""The event loop a signerd process runs on: uvloop when installed, else asyncio's own.

``server.event_loop``: ``"auto"`` (the default: uvloop if it can be imported),
``"uvloop"`` (required: a configuration error when it is not installed) or
``"asyncio"``. uvloop is libuv under asyncio's interface; measured side by
side on the benchmark's sign path it costs less CPU per request than the
asyncio loop (see the benchmark's notes).
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

_T = TypeVar("_T")


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The factory of the loop ``choice`` names (``auto`` falls back to asyncio's)."""
    if choice != "asyncio":
        try:
            uvloop = importlib.import_module("uvloop")
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
            return factory
    return asyncio.new_event_loop


def run(main: Coroutine[Any, Any, _T], choice: str) -> _T:
    """``asyncio.run(main)`` on the loop ``choice`` names."""
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(main)
