"""signerd on OpenBao transit, end to end over the socket: same API as on a token."""

from __future__ import annotations

import base64
import concurrent.futures
import time
from pathlib import Path
from typing import Any

from ..conftest import start_daemon, unique
from ..support.openbao import dev_server, vault_backend_config
from ..support.rawhttp import request


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _vault_daemon(base: Path, server: Any, **keys: Any) -> Any:
    backend = vault_backend_config(server)
    return start_daemon(
        base,
        keys={"default_backend": "bao", **keys},
        backends={"bao": backend},
    )


def test_lifecycle_and_64_concurrent_callers_on_openbao(tmp_path: Path, openbao_dev: Any) -> None:
    """Create, 64 concurrent signs (coalesced), rotate, old kid verifies, retire refuses: as on SoftHSM."""
    d = _vault_daemon(tmp_path / "d", openbao_dev)
    sock = str(d.socket_path)
    key = f"{unique('vd')}/feedback"
    try:
        assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201

        def sign(i: int) -> tuple[int, Any]:
            reply = request(sock, "POST", "/v1/sign", {"key": key, "data": _b64(f"m{i}".encode())})
            return i, reply

        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(sign, range(256)))
        for i, reply in results:
            assert reply.status == 200, reply.body
            body = reply.json
            assert body["kid"].endswith(".v1")
            verified = request(
                sock,
                "POST",
                "/v1/verify",
                {
                    "kid": body["kid"],
                    "data": _b64(f"m{i}".encode()),
                    "signature": body["signature"],
                },
            )
            assert verified.status == 200, verified.body
        old = results[0][1].json
        rotated = request(sock, "POST", f"/v1/keys/{key}/rotate", {}).json
        assert rotated["kid"].endswith(".v2")
        again = request(
            sock,
            "POST",
            "/v1/verify",
            {"kid": old["kid"], "data": _b64(b"m0"), "signature": old["signature"]},
        )
        assert again.json["state"] == "verify-only"
        assert request(sock, "POST", f"/v1/keys/{key}/versions/1/retire", {}).status == 200
        refused = request(
            sock,
            "POST",
            "/v1/verify",
            {"kid": old["kid"], "data": _b64(b"m0"), "signature": old["signature"]},
        )
        assert (refused.status, refused.code) == (401, "retired_kid")
    finally:
        assert d.stop() == 0, d.log_text()[-2000:]
    log = d.log_text()
    assert openbao_dev.root_token not in log


def test_openbao_down_answers_503_then_recovers(tmp_path: Path) -> None:
    """OpenBao frozen: sign answers 503 backend_unavailable within the deadline; thawed: signs again."""
    with dev_server(tmp_path / "bao") as server:
        d = _vault_daemon(tmp_path / "d", server, backend_timeout=2.0)
        sock = str(d.socket_path)
        key = f"{unique('vd')}/k"
        try:
            assert request(sock, "POST", "/v1/keys", {"key": key}).status == 201
            server.pause()
            try:
                started = time.monotonic()
                reply = request(sock, "POST", "/v1/sign", {"key": key, "data": _b64(b"x")})
                took = time.monotonic() - started
                assert (reply.status, reply.code) == (503, "backend_unavailable")
                assert reply.headers.get("retry-after") == "1"
                assert took < 3.5, took
                ready = request(sock, "GET", "/v1/ready")
                assert ready.status == 503
                assert request(sock, "GET", "/v1/health").status == 200
            finally:
                server.resume()
            deadline = time.monotonic() + 15
            while True:
                reply = request(sock, "POST", "/v1/sign", {"key": key, "data": _b64(b"x")})
                if reply.status == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert reply.status == 200, reply.body
        finally:
            assert d.stop() == 0, d.log_text()[-2000:]
