"""signerctl's input and output: data and files, bounded, the local failures it reports,
and the helpers every command module uses to register and print.

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
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._files import MAX_INPUT_BYTES, InputTooLarge, NotRegularFile, read_bounded, read_file
from ..errors import InvalidBase64

if TYPE_CHECKING:
    from ..client import Client


__all__ = [
    "Command",
    "Failure",
    "b64_arg",
    "data_of",
    "data_options",
    "not_a_file",
    "plain",
    "read_input",
    "register",
    "table",
]


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


# --- output, and the shape of a command ---

Command = Callable[["Client", argparse.Namespace], tuple[Any, str]]


def register(parent: Any, name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
    """Add the sub-command ``name`` to ``parent`` (a sub-parsers action), run by ``run``."""
    p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
    p.set_defaults(run=run)
    return p


def data_options(p: argparse.ArgumentParser) -> None:
    """``--data-file`` or ``--data-b64`` (else stdin), as ``data_of`` reads them."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--data-file",
        metavar="FILE",
        help="read the data from FILE, a regular file ('-': stdin); with neither option the data "
        f"is read from stdin; at most {MAX_INPUT_BYTES} bytes",
    )
    group.add_argument(
        "--data-b64",
        metavar="B64",
        help="the data, standard base64; NOTE: arguments are visible to every local user "
        "(ps, /proc/PID/cmdline), so prefer stdin or --data-file for anything not public",
    )


def plain(value: Any) -> Any:
    """Results as JSON values, in their wire forms (bytes as standard base64)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)
