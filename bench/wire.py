"""Minimal clients, so that the harness measures the servers and not client code.

- ``HttpConnection``: one keep-alive HTTP/1.1 connection over a Unix socket
  or TCP, with requests written by hand and responses read with
  ``Content-Length`` or chunked framing. The same client talks to signerd and
  to OpenBao, so neither side pays for a heavier client than the other.
- ``AgentConnection``: the OpenSSH agent protocol (draft-miller-ssh-agent),
  just enough to list identities and sign.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any


class WireError(Exception):
    """A request failed: connection trouble or a non-success answer."""


class HttpConnection:
    """One keep-alive HTTP/1.1 connection (Unix socket path or (host, port))."""

    def __init__(self, address: str | tuple[str, int], headers: dict[str, str] | None = None):
        self.address = address
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.host = "localhost" if isinstance(address, str) else f"{address[0]}:{address[1]}"
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        if isinstance(self.address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(30.0)
        sock.connect(self.address)
        self.buf = b""
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, method: str, target: str, body: bytes | None = None) -> tuple[int, bytes]:
        """Send one request and return (status, body); reconnect once if the server closed."""
        head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}\r\n{self.extra}"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        data = head.encode() + b"\r\n" + (body or b"")
        for attempt in (0, 1):
            fresh = self.sock is None
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(data)
                return self._read_response()
            except (ConnectionError, _Closed) as exc:
                self.close()
                if fresh or attempt:
                    raise WireError(f"connection failed: {exc!r}") from exc
            except (OSError, ValueError, IndexError) as exc:
                self.close()
                raise WireError(f"request failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    def json(self, method: str, target: str, payload: Any = None, expect: int = 200) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, answer = self.request(method, target, body)
        if status != expect:
            raise WireError(f"HTTP {status}: {answer[:200]!r}")
        return json.loads(answer)

    def _recv(self) -> None:
        assert self.sock is not None
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _Closed()
        self.buf += chunk

    def _read_response(self) -> tuple[int, bytes]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            self._recv()
        lines = self.buf[:end].decode("latin-1").split("\r\n")
        self.buf = self.buf[end + 4 :]
        status = int(lines[0].split(" ", 2)[1])
        length = -1
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if status in (204, 304) or status < 200:
            body = b""
        elif chunked:
            body = self._read_chunked()
        else:
            if length < 0:
                raise WireError("response without Content-Length")
            while len(self.buf) < length:
                self._recv()
            body, self.buf = self.buf[:length], self.buf[length:]
        if close:
            self.close()
        return status, body

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            while (eol := self.buf.find(b"\r\n")) < 0:
                self._recv()
            size = int(self.buf[:eol].split(b";")[0], 16)
            self.buf = self.buf[eol + 2 :]
            while len(self.buf) < size + 2:
                self._recv()
            parts.append(self.buf[:size])
            self.buf = self.buf[size + 2 :]
            if size == 0:  # no trailers are expected; skip up to the blank line
                return b"".join(parts)


class _Closed(Exception):
    pass


# --- OpenSSH agent protocol ---

SSH_AGENTC_REQUEST_IDENTITIES = 11
SSH_AGENT_IDENTITIES_ANSWER = 12
SSH_AGENTC_SIGN_REQUEST = 13
SSH_AGENT_SIGN_RESPONSE = 14


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _read_string(data: bytes, offset: int) -> tuple[bytes, int]:
    (size,) = struct.unpack_from(">I", data, offset)
    start = offset + 4
    return data[start : start + size], start + size


class AgentConnection:
    """A connection to an SSH agent socket that signs with its first Ed25519 key."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30.0)
        self.sock.connect(path)
        self.key_blob = self._first_ed25519_key()

    def _call(self, message: bytes) -> bytes:
        self.sock.sendall(struct.pack(">I", len(message)) + message)
        header = self._exactly(4)
        (size,) = struct.unpack(">I", header)
        return self._exactly(size)

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise WireError("agent closed the connection")
            data += chunk
        return data

    def _first_ed25519_key(self) -> bytes:
        answer = self._call(bytes([SSH_AGENTC_REQUEST_IDENTITIES]))
        if answer[0] != SSH_AGENT_IDENTITIES_ANSWER:
            raise WireError(f"unexpected agent answer {answer[0]}")
        (count,) = struct.unpack_from(">I", answer, 1)
        offset = 5
        for _ in range(count):
            blob, offset = _read_string(answer, offset)
            _comment, offset = _read_string(answer, offset)
            key_type, _ = _read_string(blob, 0)
            if key_type == b"ssh-ed25519":
                return blob
        raise WireError("agent holds no Ed25519 key")

    def sign(self, data: bytes) -> bytes:
        """Return the raw 64-byte Ed25519 signature of ``data``."""
        message = bytes([SSH_AGENTC_SIGN_REQUEST]) + _string(self.key_blob) + _string(data)
        answer = self._call(message + struct.pack(">I", 0))
        if answer[0] != SSH_AGENT_SIGN_RESPONSE:
            raise WireError(f"agent refused to sign (message {answer[0]})")
        blob, _ = _read_string(answer, 1)
        algorithm, offset = _read_string(blob, 0)
        signature, _ = _read_string(blob, offset)
        if algorithm != b"ssh-ed25519" or len(signature) != 64:
            raise WireError("agent answered with an unexpected signature")
        return signature

    def close(self) -> None:
        self.sock.close()
