"""signerctl's input: data and files, bounded, and the local failures it reports.

Data comes from ``--data-b64``, ``--data-file`` (a regular file only; ``-``:
stdin) or stdin, at most ``MAX_INPUT_BYTES`` (1 MiB, signerd's default
``server.max_body_bytes``): more is ``input_too_large`` (exit 65), and a
device, FIFO, socket or directory where a file is expected is ``not_a_file``
(exit 66), refused before anything is read from it.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys

from .._files import MAX_INPUT_BYTES, InputTooLarge, NotRegularFile, read_bounded, read_file
from ..errors import InvalidBase64

__all__ = ["Failure", "b64_arg", "data_of", "not_a_file", "read_input"]


class Failure(Exception):
    """A local failure: a label for the error line, and the exit code."""

    def __init__(self, exit_code: int, code: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.code = code
        self.message = message


def b64_arg(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64(f"{what} is not valid standard base64") from None


def not_a_file(path: str) -> Failure:
    return Failure(
        os.EX_NOINPUT,
        "not_a_file",
        f"{path}: not a regular file (a device, FIFO, socket or directory); "
        "give a file, or pipe the data on stdin",
    )


def too_large(exc: InputTooLarge) -> Failure:
    return Failure(
        os.EX_DATAERR,
        "input_too_large",
        f"{exc.what}: more than {exc.limit} bytes (signerctl reads at most {exc.limit}, "
        "signerd's default server.max_body_bytes)",
    )


def stdin_data() -> bytes:
    try:
        return read_bounded(sys.stdin.buffer, MAX_INPUT_BYTES, "stdin")
    except InputTooLarge as exc:
        raise too_large(exc) from None


def read_input(path: str) -> bytes:
    """A file's bytes ('-': stdin), at most MAX_INPUT_BYTES; regular files only."""
    if path == "-":
        return stdin_data()
    try:
        return read_file(path, MAX_INPUT_BYTES)
    except NotRegularFile:
        raise not_a_file(path) from None
    except InputTooLarge as exc:
        raise too_large(exc) from None
    except OSError as exc:
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read {path}: {exc.strerror}") from None


def data_of(args: argparse.Namespace) -> bytes:
    """The data of a sign or verify: --data-b64, --data-file or stdin (not a terminal)."""
    if args.data_b64 is not None:
        return b64_arg(args.data_b64, "--data-b64")
    if args.data_file is not None:
        return read_input(args.data_file)
    if sys.stdin is None or sys.stdin.isatty():
        raise Failure(
            os.EX_USAGE, "usage", "no data: give --data-file, --data-b64 or pipe it on stdin"
        )
    return stdin_data()
