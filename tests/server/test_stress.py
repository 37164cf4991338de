"""32 concurrent callers for 60 s against one daemon on SoftHSM: no crash, no error."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import os
import socket
import threading
import time
from collections import Counter

import pytest

from ..conftest import DaemonProcess, start_daemon, unique

CALLERS = 32
PROCESSES = 4
SECONDS = float(os.environ.get("SIGNERD_STRESS_SECONDS", "60"))


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self._path)


def _caller(
    path: str,
    key: str,
    until: float,
    out: Counter[str],
    samples: list[tuple[bytes, dict[str, str]]],
) -> None:
    conn = _Conn(path)
    n = 0
    while time.monotonic() < until:
        data = f"{threading.get_ident()}-{n}".encode()
        n += 1
        try:
            conn.request(
                "POST",
                "/v1/sign",
                body=json.dumps({"key": key, "data": base64.b64encode(data).decode()}),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            body = json.loads(resp.read())
        except (OSError, http.client.HTTPException) as exc:
            out[f"exception:{type(exc).__name__}"] += 1
            conn.close()
            conn = _Conn(path)
            continue
        if resp.status == 200:
            out["ok"] += 1
            if n % 500 == 1:
                samples.append((data, body))
        else:
            out[f"http:{resp.status}:{body.get('error', {}).get('code')}"] += 1
    conn.close()


def _process(
    path: str, key: str, threads: int, seconds: float
) -> tuple[dict[str, int], list[tuple[bytes, dict[str, str]]]]:
    until = time.monotonic() + seconds
    out: Counter[str] = Counter()
    samples: list[tuple[bytes, dict[str, str]]] = []
    workers = [
        threading.Thread(target=_caller, args=(path, key, until, out, samples))
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 60)
    return dict(out), samples


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_32_callers_for_60s_no_crash_no_error(tmp_path: object) -> None:
    """32 concurrent signing callers for 60 s: the daemon survives and every request succeeds."""
    from pathlib import Path

    d: DaemonProcess = start_daemon(Path(str(tmp_path)) / "stress")
    key = f"{unique('st')}/k"
    try:
        from ..support.rawhttp import request

        assert request(str(d.socket_path), "POST", "/v1/keys", {"key": key}).status == 201
        totals: Counter[str] = Counter()
        samples: list[tuple[bytes, dict[str, str]]] = []
        with concurrent.futures.ProcessPoolExecutor(PROCESSES) as pool:
            futures = [
                pool.submit(_process, str(d.socket_path), key, CALLERS // PROCESSES, SECONDS)
                for _ in range(PROCESSES)
            ]
            for f in futures:
                counts, s = f.result(timeout=SECONDS + 120)
                totals.update(counts)
                samples.extend(s)
        assert d.proc.poll() is None, f"daemon died:\n{d.log_text()[-3000:]}"
        assert set(totals) == {"ok"}, f"{totals}\n{d.log_text()[-3000:]}"
        assert totals["ok"] > CALLERS * 10
        for data, body in samples[:50]:
            reply = request(
                str(d.socket_path),
                "POST",
                "/v1/verify",
                {
                    "kid": body["kid"],
                    "data": base64.b64encode(data).decode(),
                    "signature": body["signature"],
                },
            )
            assert reply.status == 200, reply.body
        print(
            f"stress: {totals['ok']} signatures in {SECONDS:.0f}s = {totals['ok'] / SECONDS:.0f}/s"
        )
    finally:
        assert d.stop() == 0, d.log_text()[-3000:]
        assert "Segmentation" not in d.log_text()
