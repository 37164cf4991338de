"""The ``signerd`` process: configuration, backends, socket, signals.

    signerd --config /etc/signerd/signerd.toml [--check]

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
validates the configuration as start-up would read it (the policy, the audit
settings, every backend table) and creates nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .._config import ConfigError, load
from ..backends import CredentialsRefused
from ..errors import SignerdError
from ._assemble import check
from ._forward import run_forwarder
from ._journal import setup_logging
from ._loop import run
from ._single import serve
from ._sockets import SocketError
from ._supervised import supervise
from ._systemd import ActivationError, notify

__all__ = ["exit_code", "main"]


def _credentials_refused(exc: BaseException) -> str | None:
    """Why a start-up failure is the configuration's fault (a refused PIN/token), or None."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, CredentialsRefused):
            return cause.reason
        cause = cause.__cause__
    return None


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
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--forward", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.check:
            check(config)
            print(f"signerd: {args.config}: ok")
            return os.EX_OK
        setup_logging(config.log_level)
        if args.forward:  # the audit forwarder's own process, started by the daemon
            return run_forwarder(config)
        if config.workers > 1:
            return supervise(config, exit_code)
        run(serve(config), config.event_loop)
    except BaseException as exc:
        return exit_code(exc)
    return os.EX_OK


def exit_code(exc: BaseException) -> int:
    """The exit status for an exception that ended start-up (re-raised when it is not ours)."""
    if isinstance(exc, ConfigError | ActivationError):
        _fail(f"configuration error: {exc}")
        return os.EX_CONFIG
    if isinstance(exc, SocketError):
        _fail(f"cannot listen: {exc}")
        return os.EX_CANTCREAT
    if isinstance(exc, SignerdError):
        cause = _credentials_refused(exc)
        if cause is not None:
            _fail(f"configuration error: {exc.message} ({cause}); not retrying")
            return os.EX_CONFIG
        _fail(f"cannot start: {exc.code}: {exc.message}")
        return os.EX_UNAVAILABLE
    if isinstance(exc, OSError):
        _fail(f"cannot start: {exc}")
        return os.EX_OSERR
    raise exc


if __name__ == "__main__":
    sys.exit(main())
