"""A fault-injecting double at the PKCS#11 boundary, wrapping the real python-pkcs11 objects.

``FaultyLib`` stands in for ``pkcs11.lib``: every call reaches the real library
(SoftHSM) unless the ``Faults`` plan says otherwise. A plan raises a given
python-pkcs11 exception on the next N calls of one operation (``get_objects``,
``get_key``, ``sign``, ``open``, ``get_token``, ...), or makes searches return
nothing or only their first object, without an error, as SoftHSM does when it
cannot open its files.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11

_HOLD = """
import fcntl, os, sys
fds = []
for root, _, names in os.walk(sys.argv[1]):
    for name in names:
        if name.endswith((".object", ".lock")):
            fd = os.open(os.path.join(root, name), os.O_RDWR)
            fcntl.lockf(fd, fcntl.LOCK_EX)
            fds.append(fd)
print(len(fds), flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held_token(tokens: Path) -> Iterator[None]:
    """SoftHSM's token store (``tokens``) locked by another process: every call into it
    blocks until the block ends. A real hang, not a double."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tokens)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and int(holder.stdout.readline()) > 0
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)


@dataclass
class Faults:
    """What the double does instead of the real call, and what it saw."""

    raises: dict[str, list[type[Exception]]] = field(default_factory=dict)
    listing: str = "real"  # "real", "empty" or "partial" (the first object only)
    listing_calls: int = 0  # how many more searches get ``listing`` (0: all of them)
    calls: dict[str, int] = field(default_factory=dict)
    reinitialized: int = 0
    logins: int = 0

    def fail(self, op: str, error: type[Exception], times: int = 1) -> None:
        """The next ``times`` calls of ``op`` raise ``error``."""
        self.raises.setdefault(op, []).extend([error] * times)

    def hit(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1
        queue = self.raises.get(op)
        if queue:
            raise queue.pop(0)()

    def search(self, found: Iterator[Any]) -> Iterator[Any]:
        mode = self.listing
        if mode != "real" and self.listing_calls:
            self.listing_calls -= 1
            if not self.listing_calls:
                self.listing = "real"
        if mode == "empty":
            return iter(())
        if mode == "partial":
            return iter(list(found)[:1])
        return found


class _Object:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def __getitem__(self, attr: Any) -> Any:
        self._faults.hit("attribute")
        return self._real[attr]

    def sign(self, data: bytes, **kwargs: Any) -> bytes:
        self._faults.hit("sign")
        return bytes(self._real.sign(data, **kwargs))

    def destroy(self) -> None:
        self._faults.hit("destroy")
        self._real.destroy()


class _Params:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def generate_keypair(self, **kwargs: Any) -> tuple[Any, Any]:
        self._faults.hit("generate_keypair")
        pub, priv = self._real.generate_keypair(**kwargs)
        return _Object(pub, self._faults), _Object(priv, self._faults)


class FaultySession:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def get_objects(self, template: Any = None) -> Iterator[Any]:
        self._faults.hit("get_objects")
        found = (_Object(o, self._faults) for o in self._real.get_objects(template))
        return self._faults.search(found)

    def get_key(self, **kwargs: Any) -> Any:
        self._faults.hit("get_key")
        if self._faults.listing == "empty":
            self._faults.search(iter(()))
            raise pkcs11.exceptions.NoSuchKey("no key")
        return _Object(self._real.get_key(**kwargs), self._faults)

    def create_object(self, attrs: Any) -> Any:
        self._faults.hit("create_object")
        return _Object(self._real.create_object(attrs), self._faults)

    def create_domain_parameters(self, *args: Any, **kwargs: Any) -> Any:
        self._faults.hit("create_domain_parameters")
        return _Params(self._real.create_domain_parameters(*args, **kwargs), self._faults)

    def close(self) -> None:
        self._faults.hit("close")
        self._real.close()


class _Token:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults
        self.label = real.label

    def open(self, **kwargs: Any) -> FaultySession:
        self._faults.hit("open")
        if "user_pin" in kwargs:
            self._faults.logins += 1
        return FaultySession(self._real.open(**kwargs), self._faults)


class FaultyLib:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def get_token(self, **kwargs: Any) -> _Token:
        self._faults.hit("get_token")
        return _Token(self._real.get_token(**kwargs), self._faults)

    def reinitialize(self) -> None:
        self._faults.reinitialized += 1
        self._faults.hit("reinitialize")
        self._real.reinitialize()


def faulty_lib(faults: Faults) -> Callable[[str], FaultyLib]:
    """An ``open_lib`` for ``Pkcs11Backend``: the real library behind ``faults``."""
    return lambda module: FaultyLib(pkcs11.lib(module), faults)
