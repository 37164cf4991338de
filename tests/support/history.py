"""Histories of concurrent operations on signerd, recorded as JSON lines and checked after.

A ``Recorder`` writes one line when an operation is invoked and one when it completes
(``ok`` with its result, or ``fail`` with the wire code), each with ``time.monotonic_ns()``
(CLOCK_MONOTONIC: comparable across the processes of one machine). Several processes
each write a file of their own; ``load`` merges them into ``Op`` records (an invocation
with its completion), and ``check`` (tests/support/history_checks.py) returns the
anomalies the history shows, in the manner of Jepsen's checkers: real-time order is
"a completed before b was invoked", and a sign may observe any state the key could have
had between its invocation and its completion.

Line kinds: ``{"type": "invoke", "id", "process", "f", "time", "args"}``,
``{"type": "ok", "id", "time", "value"}``, ``{"type": "fail", "id", "time", "code"}``,
and ``{"type": "pubkey", "kid", "x"}`` (a kid's public key, from ``GET /v1/kids/KID``).
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STATE_ORDER", "Op", "Recorder", "load", "snapshot"]

STATE_ORDER = {"pending": 0, "active": 1, "verify-only": 2, "retired": 3, "destroyed": 4}
"""A version's states in the only order it may pass through them."""


@dataclass
class Op:
    """One operation: what was invoked, when, and how it completed (``None``: never did)."""

    id: str
    process: str
    f: str
    inv: int  # monotonic ns at invocation
    args: dict[str, Any]
    cmp: int | None = None  # monotonic ns at completion
    ok: bool | None = None
    value: dict[str, Any] = field(default_factory=dict)
    code: str | None = None

    @property
    def end(self) -> float:
        """The completion time; an operation that never completed may take effect any time."""
        return float("inf") if self.cmp is None else self.cmp


def snapshot(description: Any) -> list[dict[str, Any]]:
    """The versions of a client KeyDescription as history values: version, kid, state."""
    return [
        {"version": v.version, "kid": v.kid, "state": str(v.state)} for v in description.versions
    ]


class Recorder:
    """Appends one process's history lines to ``path`` (thread-safe, flushed per line)."""

    def __init__(self, path: Path, process: str) -> None:
        self.path = path
        self.process = process
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _write(self, line: dict[str, Any]) -> None:
        text = json.dumps(line, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(text)
            self._file.flush()

    def invoke(self, f: str, **args: Any) -> str:
        """Record an invocation; returns its id for ``ok`` or ``fail``."""
        op_id = f"{self.process}:{next(self._ids)}"
        self._write(
            {
                "type": "invoke",
                "id": op_id,
                "process": self.process,
                "f": f,
                "time": time.monotonic_ns(),
                "args": args,
            }
        )
        return op_id

    def ok(self, op_id: str, **value: Any) -> None:
        self._write({"type": "ok", "id": op_id, "time": time.monotonic_ns(), "value": value})

    def fail(self, op_id: str, code: str) -> None:
        self._write({"type": "fail", "id": op_id, "time": time.monotonic_ns(), "code": code})

    def pubkey(self, kid: str, x: str) -> None:
        self._write({"type": "pubkey", "kid": kid, "x": x})

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def load(paths: Iterable[Path | str]) -> tuple[list[Op], dict[str, set[str]]]:
    """The operations of the history files (by invocation time) and each kid's public keys
    (base64url ``x``; more than one for a kid is an anomaly the checker reports)."""
    ops: dict[str, Op] = {}
    keys: dict[str, set[str]] = {}
    for line in _lines(Path(p) for p in paths):
        kind = line["type"]
        if kind == "invoke":
            ops[line["id"]] = Op(line["id"], line["process"], line["f"], line["time"], line["args"])
        elif kind in ("ok", "fail"):
            op = ops[line["id"]]
            op.cmp, op.ok = line["time"], kind == "ok"
            op.value = line.get("value", {})
            op.code = line.get("code")
        elif kind == "pubkey":
            keys.setdefault(line["kid"], set()).add(line["x"])
    return sorted(ops.values(), key=lambda o: o.inv), keys


def write_lines(path: Path, lines: Iterable[dict[str, Any]]) -> Path:
    """Write hand-made history lines (for the checker's own tests)."""
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def pid_process(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}"
