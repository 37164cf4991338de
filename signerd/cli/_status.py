"""``signerctl status``: the daemon's state on one screen (``GET /v1/status``).

::

    status [--watch [--interval SECONDS] [--count N]]

Backends and their health, each key with its active kid, age, versions by
state and rotation due date (``keys.max_active_age``; OVERDUE past it), the
audit trail, the nonce store, the workers (pid, uptime, restarts), and the
daemon's version and uptime. ``--json`` prints the document as signerd sent
it. Exit status: 0 healthy, 1 degraded (the problems are listed), sysexits
when signerd cannot be reached or refuses (as every command). ``--watch``
redraws the screen every ``--interval`` seconds (with ``--json``: one
document per line) until interrupted, or ``--count`` times, with a chart of the
signing rate and p99 between frames under it (``_chart``; it needs the
metrics grant too).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import sys
import time
from typing import Any

from ..client import Client, default_socket_path
from ._chart import SignChart
from ._io import register, table

__all__ = ["DEGRADED", "add_commands", "exit_status", "render"]

DEGRADED = 1  # the exit status of a daemon that answers but is degraded
_CLEAR = "\x1b[H\x1b[2J"


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError("must be 0.1 to 3600 seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"not a count: {text!r}")
    return int(text)


def add_commands(sub: Any) -> None:
    p = register(
        sub, "status", _status, "backends, keys and rotation due dates, audit, nonces, workers"
    )
    p.add_argument("--watch", action="store_true", help="redraw the screen until interrupted")
    p.add_argument(
        "--interval", type=_interval, default=2.0, metavar="SECONDS", help="with --watch"
    )
    p.add_argument(
        "--count", type=_count, default=0, metavar="N", help="with --watch: stop after N screens"
    )
    p.set_defaults(exit_of=exit_status)


def exit_status(doc: Any) -> int:
    """0 for a healthy daemon, DEGRADED for one with problems."""
    return 0 if isinstance(doc, dict) and doc.get("status") == "healthy" else DEGRADED


def _status(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    doc: dict[str, Any]
    if not a.watch:
        doc = c.status()
        return doc, render(doc)
    shown = 0
    doc = {}
    chart = None if a.json else SignChart()
    try:
        while True:
            doc = c.status()
            frame = json.dumps(doc) if a.json else _CLEAR + render(doc)
            if chart is not None:
                frame += "\n\n" + "\n".join(_charted(chart, a))
            sys.stdout.write(frame + "\n")
            sys.stdout.flush()
            shown += 1
            if a.count and shown >= a.count:
                break
            time.sleep(a.interval)
    except KeyboardInterrupt:
        pass
    a.printed = True  # every frame is out already
    return doc, ""


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _charted(chart: SignChart, a: argparse.Namespace) -> list[str]:
    """Read GET /metrics into the chart; its lines (or why there is none)."""
    conn = _UnixHTTP(a.socket or default_socket_path(), a.timeout)
    try:
        conn.request("GET", "/metrics")
        reply = conn.getresponse()
        body = reply.read(16 * 1024 * 1024)
    except OSError:
        return ["sign rate  (GET /metrics did not answer)"]
    finally:
        conn.close()
    if reply.status != 200:
        return [
            f"sign rate  (GET /metrics answered {reply.status}: the chart needs the metrics grant)"
        ]
    try:
        chart.add(body.decode("utf-8"), time.monotonic())
    except ValueError:
        return ["sign rate  (GET /metrics answered something else than the exposition)"]
    return chart.render()


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{s:02d}s"


def _when(ts: float | None) -> str:
    return "-" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def render(doc: dict[str, Any]) -> str:
    """The status document as one screen of text."""
    out = [
        f"signerd {doc['version']}  {doc['status'].upper()}  up {_span(doc['uptime_seconds'])}"
        f"  (since {_when(doc['started_at'])})",
        "",
    ]
    rows = [["BACKEND", "TYPE", "HEALTH", "NODE"]]
    rows += [
        [
            b["name"],
            b["type"],
            "up" if b["up"] else f"DOWN ({b['code']})",
            b.get("node") or "-",
        ]
        for b in doc["backends"]
    ]
    out += [table(rows), ""]
    keys = doc["keys"]
    if keys:
        rows = [["KEY", "BACKEND", "ACTIVE KID", "AGE", "VERSIONS", "ROTATION DUE"]]
        for k in keys:
            versions = ",".join(f"{s}={n}" for s, n in sorted(k["versions"].items()))
            due = _when(k["rotation_due_at"]) + ("  OVERDUE" if k["overdue"] else "")
            rows.append(
                [
                    k["key"],
                    k["backend"],
                    k["active_kid"] or "-",
                    _span(k["age_seconds"]),
                    versions,
                    due,
                ]
            )
        out.append(table(rows))
    else:
        out.append("no keys")
    if doc["keys_total"] > len(keys):
        out.append(f"(the first {len(keys)} of {doc['keys_total']} keys)")
    audit, nonces = doc["audit"], doc["nonces"]
    entries = "?" if nonces["entries"] is None else str(nonces["entries"])
    out += [
        "",
        f"audit   {'healthy' if audit['healthy'] else 'STUCK OR CLOSED'}, {audit['queued']} queued",
        *_forwarding_lines(audit.get("forwarding")),
        f"nonces  {nonces['store']}, {entries} entries",
        "",
    ]
    rows = [["WORKER", "PID", "UP", "RESTARTS"]]
    rows += [
        [str(w["index"]), str(w["pid"]), _span(w["uptime_seconds"]), str(w["restarts"])]
        for w in doc["workers"]
    ]
    out.append(table(rows))
    if doc["problems"]:
        out += ["", "problems:", *(f"  {p}" for p in doc["problems"])]
    return "\n".join(out)


def _forwarding_lines(fwd: dict[str, Any] | None) -> list[str]:
    """The audit forwarder's line (none without [forwarding])."""
    if fwd is None:
        return []
    lag = "lag unknown" if fwd["lag_bytes"] is None else f"lag {fwd['lag_bytes']} bytes"
    beat = fwd["heartbeat_age_seconds"]
    seen = "never looked" if beat is None else f"looked {_span(beat)} ago"
    health = "healthy" if fwd["healthy"] else "PAST ITS BOUND" if fwd["refusing"] else "SILENT"
    return [f"forward {health}, {lag}, {seen}"]
