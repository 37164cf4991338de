"""signerctl's parser: the global options, accepted before or after the command, and the
help of each command (an example and the exit codes).

The global options (``--socket``, ``--json``, ``--timeout``, ``--field``) are added to
the top parser with their defaults and to every command's parser with no default
(``SUPPRESS``), so ``signerctl --json keys list`` and ``signerctl keys list --json``
mean the same, and a value given after the command wins over one given before it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import NoReturn

#: signerd's default socket (the client's ``DEFAULT_SOCKET``; a test keeps them equal:
#: the client is not imported to print the help)
DEFAULT_SOCKET = "/run/signerd/signerd.sock"
DEFAULT_TIMEOUT = 10.0

EXIT_CODES = """exit codes:
  0   success (verify: the signature is valid; audit verify: the trail is intact)
  1   status: signerd answers but is degraded (a backend down, a key past its due date)
  64  bad arguments
  65  the data or signature is refused (invalid_signature, invalid_state, ...)
  66  no such key, version or kid; a file that cannot be read
  69  signerd or its backend is unavailable
  70  internal error, or an answer outside the protocol
  73  the key or peer key exists already
  75  try again later (rate_limited, backend_error, no answer within --timeout)
  76  signerctl and signerd disagree on the protocol
  77  permission denied"""

#: one example per command, by its path ("" is signerctl itself)
EXAMPLES: dict[str, str] = {
    "": "signerctl --socket /run/signerd/signerd.sock keys list --tenant acme",
    "keys": "signerctl keys show acme/feedback",
    "keys list": "signerctl keys list --tenant acme",
    "keys show": "signerctl keys show acme/feedback --field active_kid",
    "keys create": "signerctl keys create acme/feedback",
    "keys rotate": "signerctl keys rotate acme/feedback --pending --dry-run",
    "keys promote": "signerctl keys promote acme/feedback --pending --if-any",
    "keys retire": "signerctl keys retire acme/feedback 1 --dry-run",
    "keys destroy": "signerctl keys destroy acme/feedback 1 --dry-run",
    "keys cancel-deletion": "signerctl keys cancel-deletion acme/feedback 1",
    "keys purge-invalid": "signerctl keys purge-invalid --config /etc/signerd/signerd.toml --dry-run",
    "sign": "SIG=$(signerctl sign acme/feedback --field signature < report.json)",
    "verify": 'signerctl verify acme.feedback.v1 --signature "$SIG" < report.json',
    "telemetry": "signerctl telemetry sign acme/telemetry --data-file body.bin",
    "telemetry sign": "signerctl telemetry sign acme/telemetry --data-file body.bin --json",
    "telemetry verify": (
        "signerctl telemetry verify --tenant acme --kid acme.telemetry.v1 --timestamp TS "
        "--nonce=N --signature B64 --data-file body.bin"
    ),
    "feedback": "signerctl feedback sign acme/feedback --schema s1 --data-file data.json",
    "feedback sign": "signerctl feedback sign acme/feedback --schema s1 --data-file data.json",
    "feedback verify": "signerctl feedback verify --schema s1 --envelope-file envelope.json",
    "jwks": "signerctl jwks --tenant acme --json",
    "kid": "signerctl kid acme.feedback.v1",
    "health": "signerctl health",
    "ready": "signerctl ready",
    "whoami": "signerctl whoami",
    "status": "signerctl status --watch --interval 2",
    "trust": "signerctl trust list --tenant acme",
    "trust list": "signerctl trust list --tenant acme",
    "trust add": "signerctl trust add --tenant acme --kid peer-1 --jwk-file peer-1.jwk",
    "trust remove": "signerctl trust remove peer-1",
    "audit": "signerctl audit show /var/log/signerd --since 24h --key acme/feedback",
    "audit verify": "signerctl audit verify /var/log/signerd",
    "audit payload-hash": "signerctl audit payload-hash --key /var/lib/signerd/audit.key < data",
    "audit show": (
        "signerctl audit show /var/log/signerd --since 24h --key acme/feedback --operation sign"
    ),
    "audit tail": "signerctl audit tail /var/log/signerd --follow --outcome refused",
}


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise UsageError(message)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be > 0 and <= 3600 seconds")
    return value


def add_globals(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The global options on ``p``: with their defaults on the top parser, none elsewhere."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "--socket",
        metavar="PATH",
        default=default(None),
        help=f"signerd's socket (default: $SIGNERD_SOCKET, else {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--json", action="store_true", default=default(False), help="print JSON on stdout"
    )
    p.add_argument(
        "--timeout",
        type=_timeout,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help="how long to wait for signerd's whole answer, connecting included, before "
        f"giving up with exit 75 (0 < SECONDS <= 3600; default {DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "--field",
        metavar="NAME",
        default=default(None),
        help="print only this field of the JSON answer, raw (a string without quotes); "
        "NAME.SUB for a nested one, NAME.0 for a list item",
    )


def walk(
    parser: argparse.ArgumentParser, path: str = ""
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """``parser`` and every command parser below it, with its command path."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}".strip())


def finish(parser: argparse.ArgumentParser) -> None:
    """Spread the global options to every command; give each its example and exit codes."""
    for path, p in walk(parser):
        if path:
            add_globals(p, top=False)
        p.formatter_class = argparse.RawDescriptionHelpFormatter
        p.epilog = f"example:\n  {EXAMPLES[path]}\n\n{EXIT_CODES}"
