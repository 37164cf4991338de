"""The ``signerd`` process: configuration, backends, socket, signals.

    signerd --config /etc/signerd/signerd.toml [--check [--credentials-dir DIR]]

SIGTERM/SIGINT stop it gracefully (in-flight requests finish). SIGHUP reloads
the policy, the tenants' backends and ``[federation]`` from the configuration
file, all or nothing (an invalid file is refused and the old settings kept),
and reopens the audit file (log rotation), without dropping connections.
Under systemd (see ``_systemd``) it takes the activated socket, tells systemd
STATUS=, READY=1, RELOADING=1 and STOPPING=1, pings the watchdog and logs to
the journal. Configuration errors, including credentials the
backend refuses at start (a wrong PIN), exit 78 (EX_CONFIG).

With ``server.workers`` > 1 this process is the supervisor of that many
worker processes, each running ``Daemon.start`` on the shared socket (see
``_supervised``); with 1 it serves in this process (``_single``). ``--check``
checks the configuration as start-up would meet it and lists every error
(``_check``); it creates nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .._config import load
from ._check import run_check
from ._failures import describe
from ._forward import run_forwarder
from ._journal import setup_logging
from ._loop import run
from ._memory import return_large_blocks
from ._single import serve
from ._supervised import supervise
from ._systemd import notify

__all__ = ["exit_code", "main"]


def _fail(line: str) -> None:
    """The one line saying why signerd did not start: stderr (the journal) and STATUS=."""
    print(f"signerd: {line}", file=sys.stderr, flush=True)
    notify(f"STATUS=failed: {line}")


def build_parser() -> argparse.ArgumentParser:
    """signerd's command line (also the source of its man page)."""
    parser = argparse.ArgumentParser(prog="signerd", description="Ed25519 signing daemon")
    parser.add_argument("--version", action="version", version=f"signerd {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        default=os.environ.get("SIGNERD_CONFIG", "/etc/signerd/signerd.toml"),
        help="the configuration file (default: $SIGNERD_CONFIG, else /etc/signerd/signerd.toml)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the configuration as start-up would (backends opened and logged in,"
        " socket directory, policy users and groups, federation files), report every"
        " error and exit: 0 when it passes, 78 otherwise",
    )
    parser.add_argument(
        "--credentials-dir",
        metavar="DIR",
        help="with --check: where credential:NAME values are read (default:"
        " $CREDENTIALS_DIRECTORY, else the LoadCredential= files of signerd.service)",
    )
    parser.add_argument("--forward", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.credentials_dir is not None and not args.check:
        parser.error("--credentials-dir is used with --check only")
    if args.check:
        return run_check(args.config, args.credentials_dir)
    try:
        config = load(args.config)
        setup_logging(config.log_level)
        if args.forward:  # the audit forwarder's own process, started by the daemon
            return run_forwarder(config)
        return_large_blocks()  # before the workers fork: they inherit it
        if config.workers > 1:
            return supervise(config, exit_code)
        run(serve(config), config.event_loop)
    except BaseException as exc:
        return exit_code(exc)
    return os.EX_OK


def exit_code(exc: BaseException) -> int:
    """The exit status for an exception that ended start-up (re-raised when it is not ours)."""
    described = describe(exc)
    if described is None:
        raise exc
    status, line = described
    _fail(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
