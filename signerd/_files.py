"""Reading files that tools are given: regular files only, and never without bound.

A path where a file is expected must name a regular file: a device
(``/dev/zero``, ``/dev/urandom``), a FIFO, a socket or a directory is refused
with ``NotRegularFile`` before anything is read (a FIFO is opened without
blocking, so a FIFO nobody writes to cannot hang the caller). Data is read up
to a limit, and one byte more to tell "exactly the limit" from "over it".
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from typing import BinaryIO

__all__ = [
    "MAX_INPUT_BYTES",
    "InputTooLarge",
    "NotRegularFile",
    "bounded_lines",
    "open_regular",
    "read_bounded",
    "read_file",
]

#: the most data signerctl reads for one request: signerd's default ``server.max_body_bytes``
#: (a request body carries the data base64-encoded, so no more than this can ever be signed
#: with the default limit)
MAX_INPUT_BYTES = 1 << 20


class NotRegularFile(OSError):
    """A path naming a device, FIFO, socket or directory where a regular file is expected."""

    def __init__(self, path: str) -> None:
        super().__init__(errno.EINVAL, "not a regular file", path)


class InputTooLarge(ValueError):
    """More input than the limit allows."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what}: more than {limit} bytes")
        self.what, self.limit = what, limit


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading; NotRegularFile unless it is a regular file (OSError else)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(stream: BinaryIO, limit: int, what: str) -> bytes:
    """All of ``stream`` (a file, stdin), or InputTooLarge once it gives more than ``limit``."""
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise InputTooLarge(what, limit)
    return data


def read_file(path: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (see ``open_regular``)."""
    with open_regular(path) as handle:
        return read_bounded(handle, limit, path)


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes]:
    """The lines of ``handle``, each cut after ``limit`` bytes (a longer line comes in pieces,
    none of them ending in a newline but the last): memory stays bounded on any file."""
    return iter(lambda: handle.readline(limit), b"")
