"""``python -m bench.minimal``: the ``ref-minimal`` server, the least a signing server does.

A reference for the benchmark, not part of signerd: HTTP/1.1 over a Unix
socket with httptools on a uvloop loop, in ``--procs`` pre-forked processes
sharing one listening socket. Each process has its own token session and
Ed25519 key (SoftHSM2 through python-pkcs11) and its own audit file; with
``--bao-addr`` it signs on OpenBao transit instead (``minimal_bao``).

Per loop turn, the requests that arrived form a group. For the group, an
intent record per request (request id, key, kid, keyed hash of the payload)
is handed to a writer thread, which writes them and fsyncs the file, *while*
the loop signs each payload on the token and checks each signature with
``cryptography``. A request is answered when both its signature is checked and
its intent record is durable; its outcome record goes out with the next
write, not waited for. Nothing else: no policy, no limits, no hash chain.

Prints ``ready`` on stdout once every process can sign; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
_FAILED = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


class Writer:
    """One thread: appends the lines handed to it and fsyncs, one write per batch.

    ``commit(lines, done)``: ``done(ok)`` is called on the loop once the lines are
    durable (or not). ``later(lines)``: lines nobody waits for, written with the next
    commit (or within 50 ms).
    """

    def __init__(self, path: str, loop: asyncio.AbstractEventLoop) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.loop = loop
        self.cond = threading.Condition()
        self.waited: list[tuple[list[bytes], Callable[[bool], None]]] = []
        self.tail: list[bytes] = []
        threading.Thread(target=self._run, name="ref-writer", daemon=True).start()

    def commit(self, lines: list[bytes], done: Callable[[bool], None]) -> None:
        with self.cond:
            self.waited.append((lines, done))
            self.cond.notify()

    def later(self, lines: list[bytes]) -> None:
        with self.cond:
            self.tail.extend(lines)

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waited:
                    if not self.cond.wait(0.05) and self.tail:
                        break
                waited, self.waited = self.waited, []
                tail, self.tail = self.tail, []
            data = b"".join(tail + [line for lines, _ in waited for line in lines])
            try:
                os.write(self.fd, data)
                os.fsync(self.fd)
                ok = True
            except OSError:
                ok = False
            if waited:
                dones = [done for _, done in waited]
                self.loop.call_soon_threadsafe(_call_all, dones, ok)


def _call_all(dones: list[Callable[[bool], None]], ok: bool) -> None:
    for done in dones:
        done(ok)


class _Group:
    """Where a group stands: signed and checked on the loop; durable on the writer thread."""

    __slots__ = ("durable", "signed")

    def __init__(self) -> None:
        self.signed = False
        self.durable: bool | None = None


class Signer:
    """One process's key, its audit writer and the current group. ``sign_group`` signs a
    group's payloads and checks each signature; this class signs on the token."""

    def __init__(self, kid: str, writer: Writer) -> None:
        self.kid, self.writer = kid, writer
        self.mac_key = secrets.token_bytes(32)
        self.prefix = secrets.token_hex(8)
        self.seq = 0
        self.group: list[tuple[Conn, bytes]] = []
        self.loop = writer.loop

    def add(self, conn: Conn, body: bytes) -> None:
        if not self.group:
            self.loop.call_soon(self.flush)  # after every request of this loop turn
        self.group.append((conn, body))

    def flush(self) -> None:
        group, self.group = self.group, []
        now = time.time()
        items: list[tuple[Conn, bytes, str, str]] = []
        intents: list[bytes] = []
        for conn, body in group:
            try:
                doc = json.loads(body)
                key = doc["key"]
                data = base64.b64decode(doc["data"], validate=True)
                if not isinstance(key, str) or len(key) > 200:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                conn.send(_BAD)
                continue
            self.seq += 1
            rid = f"{self.prefix}{self.seq:016x}"
            mac = hmac.new(self.mac_key, data, hashlib.sha256).hexdigest()
            record = {"time": now, "record": "intent", "request_id": rid, "key": key}
            record.update(kid=self.kid, payload_hmac=mac)
            intents.append(json.dumps(record).encode() + b"\n")
            items.append((conn, data, rid, key))
        if not items:
            return
        state = _Group()
        answers: list[bytes] = []

        def finish() -> None:
            ok = state.durable
            outcomes = []
            for (conn, _, rid, _), answer in zip(items, answers, strict=True):
                conn.send(answer if ok else _REFUSED)
                status = "ok" if answer is not _FAILED else "backend_error"
                status = status if ok else "audit_unavailable"
                outcomes.append(
                    json.dumps({"record": "outcome", "request_id": rid, "outcome": status}).encode()
                    + b"\n"
                )
            self.writer.later(outcomes)

        def durable(ok: bool) -> None:
            state.durable = ok
            if state.signed:
                finish()

        def signed(signatures: list[bytes | None]) -> None:
            answers.extend(self.answer(s) for s in signatures)
            state.signed = True
            if state.durable is not None:
                finish()

        self.writer.commit(intents, durable)  # the disk works while the key signs
        self.sign_group([data for _, data, _, _ in items], signed)

    def answer(self, signature: bytes | None) -> bytes:
        if signature is None:
            return _FAILED
        body = b'{"kid":"%s","signature":"%s"}' % (self.kid.encode(), base64.b64encode(signature))
        return _OK_HEAD + str(len(body)).encode() + b"\r\n\r\n" + body

    def sign_group(self, datas: list[bytes], signed: Callable[[list[bytes | None]], None]) -> None:
        raise NotImplementedError


class TokenSigner(Signer):
    """Signs on the loop, on the token, one payload after another."""

    def __init__(self, private: Any, public: Any, kid: str, writer: Writer) -> None:
        from pkcs11 import Mechanism

        super().__init__(kid, writer)
        self.private, self.public = private, public
        self.mechanism = Mechanism.EDDSA

    def sign_group(self, datas: list[bytes], signed: Callable[[list[bytes | None]], None]) -> None:
        out: list[bytes | None] = []
        for data in datas:
            try:
                signature = self.private.sign(data, mechanism=self.mechanism)
                self.public.verify(signature, data)  # raises InvalidSignature
                out.append(signature)
            except Exception:
                out.append(None)
        signed(out)


class Conn(asyncio.Protocol):
    def __init__(self, signer: Signer) -> None:
        import httptools

        self.signer = signer
        self.parser = httptools.HttpRequestParser(self)
        self.error = httptools.HttpParserError
        self.body: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except self.error:
            if self.transport is not None:
                self.transport.write(_BAD)
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        self.signer.add(self, body)

    def send(self, answer: bytes) -> None:
        if self.transport is not None:
            self.transport.write(answer)


def _open_key(module: str, label: str, pin: str) -> tuple[Any, Any, Any]:
    import pkcs11
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    lib = pkcs11.lib(module)
    for attempt in range(5):  # another process may be writing the token's store
        try:
            token = lib.get_token(token_label=label)
            break
        except pkcs11.exceptions.NoSuchToken:
            if attempt == 4:
                raise
            time.sleep(0.2)
    session = token.open(user_pin=pin, rw=True)
    for attempt in range(5):  # SoftHSM2's file store: CKR_GENERAL_ERROR now and then
        try:
            public, private = session.generate_keypair(
                KeyType.EC_EDWARDS,
                mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                store=True,
                label="ref-minimal-" + secrets.token_hex(4),
                public_template={Attribute.EC_PARAMS: encode_named_curve_parameters("1.3.101.112")},
                private_template={
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                },
            )
            break
        except pkcs11.exceptions.GeneralError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    point = bytes(public[Attribute.EC_POINT])
    raw = point[2:] if len(point) == 34 else point
    return session, private, Ed25519PublicKey.from_public_bytes(raw)


def _child(listener: socket.socket, args: argparse.Namespace, number: int, ready: int) -> None:
    import uvloop

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    session: Any = None
    if args.bao_addr is None:
        # one process at a time on the token's file store (concurrent key generation in
        # SoftHSM2 fails now and then with CKR_GENERAL_ERROR)
        with open(os.path.join(args.audit_dir, "keygen.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            session, private, public = _open_key(args.module, args.token_label, args.pin)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    writer = Writer(os.path.join(args.audit_dir, f"ref-minimal-{number}.jsonl"), loop)
    signer: Signer
    if args.bao_addr is None:
        signer = TokenSigner(private, public, f"ref/minimal#{number}", writer)
    else:
        from .minimal_bao import bao_signer

        signer = bao_signer(args.bao_addr, args.bao_token, args.bao_key, writer)
    loop.run_until_complete(loop.create_unix_server(lambda: Conn(signer), sock=listener))
    os.write(ready, b"r")
    os.close(ready)
    loop.run_forever()
    del session


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.minimal", description=__doc__)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--module", help="the PKCS#11 module (SoftHSM2)")
    parser.add_argument("--token-label")
    parser.add_argument("--bao-addr", help="sign on OpenBao transit at this address instead")
    parser.add_argument("--bao-key", default="ref-minimal", help="the transit key (ed25519)")
    parser.add_argument("--audit-dir", required=True)
    parser.add_argument("--procs", type=int, default=2)
    args = parser.parse_args(argv)
    if args.bao_addr is None:
        if args.module is None or args.token_label is None:
            parser.error("--module and --token-label, or --bao-addr")
        args.pin = os.environ["REF_MINIMAL_PIN"]  # never in argv
    else:
        args.bao_token = os.environ["REF_MINIMAL_BAO_TOKEN"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(args.socket)
    listener.listen(1024)
    listener.setblocking(False)
    read_end, write_end = os.pipe()
    children = []
    for number in range(args.procs):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.close(read_end)
                _child(listener, args, number, write_end)
            except BaseException:
                code = 1
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        children.append(pid)
    os.close(write_end)

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    got = b""
    while len(got) < args.procs:
        chunk = os.read(read_end, 16)
        if not chunk:
            stop(signal.SIGTERM, None)
            return 1
        got += chunk
    print("ready", flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
