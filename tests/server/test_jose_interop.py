"""signerd's JWKS and signatures, verified by an independent JOSE implementation (npm jose).

``make test`` installs jose into ``build/jose`` (``$SIGNERD_JOSE_DIR``); a missing
node or jose is a failure, never a skip. Each daemon serves JWKs with one
``server.jwk_alg``; compact JWSs are built from signerd's raw signatures over
the JWS signing input and handed to jose with the daemon's JWKS.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..conftest import ROOT, DaemonProcess, start_daemon, unique
from ..support.rawhttp import request

JOSE_DIR = Path(os.environ.get("SIGNERD_JOSE_DIR", ROOT / "build" / "jose"))
NODE_TIMEOUT = 60.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jose_verify(jwks: Any, tokens: list[str]) -> list[dict[str, Any]]:
    """Run jose's compactVerify on each token against ``jwks``; one result per token."""
    node = shutil.which("node")
    script = JOSE_DIR / "verify.mjs"
    assert node is not None, "node is not installed (make system installs it)"
    assert (JOSE_DIR / "node_modules" / "jose").is_dir(), f"jose missing in {JOSE_DIR}: make deps"
    done = subprocess.run(
        [node, str(script)],
        input=json.dumps({"jwks": jwks, "jws": tokens}).encode(),
        capture_output=True,
        timeout=NODE_TIMEOUT,
        check=True,
        cwd=JOSE_DIR,
    )
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


class Signer:
    """A key on a daemon, signing JWS signing inputs through /v1/sign."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.sock = str(daemon.socket_path)
        self.tenant = unique("jose")
        self.key = f"{self.tenant}/k"
        reply = request(self.sock, "POST", "/v1/keys", {"key": self.key})
        assert reply.status == 201, reply.body
        self.kid = str(reply.json["active_kid"])

    def jws(self, alg: str, payload: bytes) -> str:
        header = b64url(json.dumps({"alg": alg, "kid": self.kid}).encode())
        signing_input = f"{header}.{b64url(payload)}".encode("ascii")
        data = base64.b64encode(signing_input).decode()
        reply = request(self.sock, "POST", "/v1/sign", {"key": self.key, "data": data})
        assert reply.status == 200 and reply.json["kid"] == self.kid, reply.body
        return f"{signing_input.decode()}.{b64url(base64.b64decode(reply.json['signature']))}"

    def jwks(self) -> Any:
        reply = request(self.sock, "GET", f"/v1/jwks?tenant={self.tenant}")
        assert reply.status == 200, reply.body
        return reply.json


@pytest.fixture(scope="module", params=["Ed25519", "EdDSA"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Signer]]:
    alg = str(request.param)
    server = {} if alg == "Ed25519" else {"jwk_alg": alg}  # Ed25519 is the default
    base = tmp_path_factory.mktemp("jose")
    daemon = start_daemon(base, server=server, federation={"state_dir": str(base / "state")})
    try:
        yield alg, Signer(daemon)
    finally:
        assert daemon.stop() == 0, daemon.log_text()


def test_jwks_alg_follows_the_switch(served: tuple[str, Signer]) -> None:
    """JWKS, /v1/kids and trusted keys answer alg Ed25519 by default, EdDSA when server.jwk_alg says."""
    alg, signer = served
    (jwk,) = signer.jwks()["keys"]
    assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("OKP", "Ed25519", alg, "sig")
    reply = request(signer.sock, "GET", f"/v1/kids/{signer.kid}")
    assert reply.status == 200 and reply.json["jwk"]["alg"] == alg, reply.body
    peer = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(peer)}
    body = {"tenant": signer.tenant, "kid": "peer-1", "jwk": jwk}
    reply = request(signer.sock, "POST", "/v1/trusted-keys", body)
    assert reply.status == 201 and reply.json["jwk"]["alg"] == alg, reply.body
    reply = request(signer.sock, "GET", f"/v1/trusted-keys?tenant={signer.tenant}")
    assert [k["jwk"]["alg"] for k in reply.json["keys"]] == [alg], reply.body


def test_jose_verifies_signerd_signatures(served: tuple[str, Signer]) -> None:
    """jose verifies a compact JWS of signerd's signature with the JWKS signerd serves."""
    alg, signer = served
    payload = "signé par signerd".encode()
    (result,) = jose_verify(signer.jwks(), [signer.jws(alg, payload)])
    assert result == {"ok": True, "alg": alg, "kid": signer.kid, "payload": b64url(payload)}


def test_jose_refuses_what_signerd_did_not_sign(served: tuple[str, Signer]) -> None:
    """jose refuses a JWS whose payload was changed after signerd signed it."""
    alg, signer = served
    header, _, signature = signer.jws(alg, b"original").split(".")
    (result,) = jose_verify(signer.jwks(), [f"{header}.{b64url(b'forged')}.{signature}"])
    assert result == {"ok": False, "error": "ERR_JWS_SIGNATURE_VERIFICATION_FAILED"}


def test_jose_holds_the_jwk_to_its_alg(served: tuple[str, Signer]) -> None:
    """A JWS whose header names the other alg finds no key in the JWKS: the JWK's alg is real."""
    alg, signer = served
    other = "EdDSA" if alg == "Ed25519" else "Ed25519"
    (result,) = jose_verify(signer.jwks(), [signer.jws(other, b"other alg")])
    assert result == {"ok": False, "error": "ERR_JWKS_NO_MATCHING_KEY"}
