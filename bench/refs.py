"""The reference paths: what a caller would use instead of signerd.

Each class is a load target (see ``bench.load``): picklable, and ``open()``
runs in the caller's own process and returns one signing operation.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from .load import Op
from .wire import AgentConnection, HttpConnection, WireError

MESSAGE_SIZE = 64
_PAD = b"signerd-bench|" * 5


def message(i: int) -> bytes:
    """A distinct 64-byte message per operation."""
    return (i.to_bytes(8, "big") + _PAD)[:MESSAGE_SIZE]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass(frozen=True)
class CryptoSign:
    """Ed25519 with ``cryptography`` in the caller's process: the software floor."""

    def open(self) -> Op:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        return lambda i: key.sign(message(i))


@dataclass(frozen=True)
class CryptoVerify:
    """Ed25519 verification with ``cryptography`` in the caller's process."""

    def open(self) -> Op:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        key = Ed25519PrivateKey.generate()
        public = key.public_key()
        data = message(7)
        signature = key.sign(data)
        return lambda i: public.verify(signature, data)


def token_keypair(
    module: str, token_label: str, pin: str, prefix: str
) -> tuple[Any, Any, Any, str]:
    """A session on the token and a new Ed25519 key pair in it: (session, public, private,
    label). The private key is a token object, private, sensitive and not extractable, as
    signerd keeps its keys."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    session = pkcs11.lib(module).get_token(token_label=token_label).open(user_pin=pin, rw=True)
    label = prefix + os.urandom(4).hex()
    public, private = session.generate_keypair(
        KeyType.EC_EDWARDS,
        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
        store=True,
        label=label,
        public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
        private_template={
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        },
    )
    return session, public, private, label


@dataclass(frozen=True)
class SoftHSMSign:
    """Ed25519 on a SoftHSM2 token through python-pkcs11, in the caller's process.

    The key pair is a token object, private, sensitive and not extractable,
    as signerd keeps its keys, so both pay the same token-object costs.
    """

    module: str
    token_label: str
    pin: str

    def open(self) -> Op:
        from pkcs11 import Mechanism

        session, _, private, _ = token_keypair(
            self.module, self.token_label, self.pin, "bench-ref-"
        )

        def op(i: int) -> object:
            signature = private.sign(message(i), mechanism=Mechanism.EDDSA)
            if len(signature) != 64:
                raise WireError("token returned a bad signature")
            return session  # keeps the session alive as long as the operation

        return op


AUDIT_LINE = 300  # bytes: about one signerd audit record


@dataclass(frozen=True)
class SoftHSMFloor:
    """The floor of a sign request: SoftHSM2 sign, then what signerd adds in the same process.

    ``check``: verify the signature with ``cryptography`` against the public
    key read from the token. ``audit_dir``: append a 300-byte line to a file
    there and fsync it (one record, one fsync, as an uncontended audit trail).
    One thread, one token session, no server.
    """

    module: str
    token_label: str
    pin: str
    check: bool = True
    audit_dir: str | None = None

    def open(self) -> Op:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from pkcs11 import Attribute, Mechanism

        session, public, private, label = token_keypair(
            self.module, self.token_label, self.pin, "bench-floor-"
        )
        point = bytes(public[Attribute.EC_POINT])
        raw = point[2:] if len(point) == 34 else point
        verifier = Ed25519PublicKey.from_public_bytes(raw)
        check = self.check
        fd = -1
        if self.audit_dir is not None:
            path = os.path.join(self.audit_dir, f"floor-{os.getpid()}-{label}.log")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        line = b"x" * (AUDIT_LINE - 1) + b"\n"

        def op(i: int) -> object:
            data = message(i)
            signature = private.sign(data, mechanism=Mechanism.EDDSA)
            if check:
                verifier.verify(signature, data)  # raises InvalidSignature
            if fd >= 0:
                os.write(fd, line)
                os.fsync(fd)
            return session

        return op


@dataclass(frozen=True)
class AgentSign:
    """OpenSSH ssh-agent holding an Ed25519 key, over its Unix socket."""

    socket: str

    def open(self) -> Op:
        conn = AgentConnection(self.socket)
        return lambda i: conn.sign(message(i))


@dataclass(frozen=True)
class BaoSign:
    """OpenBao transit sign, called directly over one keep-alive connection per caller."""

    host: str
    port: int
    token: str
    key: str
    batch: int = 0  # 0: one signature per request; N: batch_input of N

    def open(self) -> Op:
        conn = HttpConnection((self.host, self.port), {"X-Vault-Token": self.token})
        path = f"/v1/transit/sign/{self.key}"
        batch = self.batch

        def op(i: int) -> object:
            if batch:
                items = [{"input": b64(message(i * batch + j))} for j in range(batch)]
                payload: dict[str, object] = {"batch_input": items}
            else:
                payload = {"input": b64(message(i))}
            status, answer = conn.request("POST", path, json.dumps(payload).encode())
            if status != 200:
                raise WireError(f"HTTP {status}: {answer[:120]!r}")
            data = json.loads(answer)["data"]
            results = data["batch_results"] if batch else [data]
            if len(results) != max(batch, 1):
                raise WireError("wrong number of batch results")
            for r in results:
                if r.get("error") or not str(r.get("signature", "")).startswith("vault:v"):
                    raise WireError(f"transit item failed: {str(r.get('error'))[:80]}")
            return None

        return op
