"""signerctl: operate signerd from a shell.

::

    signerctl [--socket PATH] [--json] [--timeout SECONDS] COMMAND ...

    keys list [--tenant T]            keys show KEY           keys create KEY
    keys rotate KEY [--pending]       keys promote KEY (VERSION | --pending [--if-any])
    keys retire KEY VERSION           keys destroy KEY VERSION --confirm KID
    sign KEY [--data-file F | --data-b64 B]          (else data from stdin)
    verify KID --signature B64 [--data-file F | --data-b64 B]
    jwks [--tenant T]    kid KID    health    ready
    status [--watch [--interval SECONDS] [--count N]]
    audit verify PATH... [--anchor FILE]... [--no-anchor]
    audit payload-hash --key FILE [--data-file F | --sha256 HEX]  (else payload from stdin)
    telemetry sign|verify ...    feedback sign|verify ...

``--socket`` defaults to ``$SIGNERD_SOCKET``, else ``/run/signerd/signerd.sock``.
``--json`` prints the answer as JSON on stdout (the wire forms: ``signerctl
--json jwks`` is a JWKS document); otherwise plain tables. An error prints
``signerctl: CODE: MESSAGE (request ID)`` on stderr (and, with ``--json``,
the error envelope on stdout). signerctl never prints the data it signs or
verifies.

Exit codes (``sysexits.h``), by wire code or local condition:

===  ==============  =====================================================
 0   EX_OK           success; ``verify``: the signature is valid;
                     ``audit verify``: the trail is intact;
                     ``status``: the daemon is healthy
 1                   ``status``: the daemon answers but is degraded
64   EX_USAGE        bad arguments; no data given and stdin is a terminal
65   EX_DATAERR      invalid_signature, unknown_kid, retired_kid,
                     destroyed_kid, invalid_key_name, invalid_base64,
                     confirmation_required, invalid_state,
                     payload_too_large, stale_timestamp, schema_mismatch,
                     attestation_mismatch, replayed_nonce; an audit trail
                     that does not verify; input_too_large
66   EX_NOINPUT      unknown_key, unknown_version; a file that cannot be read
                     (no_input); not_a_file
69   EX_UNAVAILABLE  backend_unavailable, backend_sealed, audit_unavailable,
                     nonce_store_unavailable, not_supported; connection_failed (signerd unreachable)
70   EX_SOFTWARE     internal_error; an answer outside the protocol
73   EX_CANTCREAT    key_exists, shared_peer_key
75   EX_TEMPFAIL     rate_limited, backend_error; request_timeout (no answer
                     within ``--timeout``)
76   EX_PROTOCOL     malformed_json, invalid_request, unsupported_media_type,
                     method_not_allowed, not_found (signerctl and signerd
                     disagree on the protocol)
77   EX_NOPERM       permission_denied, tenant_mismatch
===  ==============  =====================================================

``connection_failed`` and ``request_timeout`` are signerctl's own labels:
they never come from the daemon. So are ``not_a_file`` (a device, FIFO,
socket or directory given where a file is expected: ``--data-file``,
``--envelope-file``, ``--key``, ``--anchor``, an audit file; nothing is read
from it) and ``input_too_large``: signerctl reads at most ``MAX_INPUT_BYTES``
(1 MiB, signerd's default ``server.max_body_bytes``) of data, from a file or
from stdin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..client import DEFAULT_SOCKET, Client, ConnectionFailed, RequestTimeout, default_socket_path
from ..errors import SignerdError
from . import _audit, _federation, _keys, _status
from ._io import Failure

EXIT_FOR_CODE: dict[str, int] = {
    "invalid_signature": os.EX_DATAERR,
    "unknown_kid": os.EX_DATAERR,
    "retired_kid": os.EX_DATAERR,
    "destroyed_kid": os.EX_DATAERR,
    "stale_timestamp": os.EX_DATAERR,
    "schema_mismatch": os.EX_DATAERR,
    "attestation_mismatch": os.EX_DATAERR,
    "replayed_nonce": os.EX_DATAERR,
    "invalid_key_name": os.EX_DATAERR,
    "invalid_base64": os.EX_DATAERR,
    "confirmation_required": os.EX_DATAERR,
    "invalid_state": os.EX_DATAERR,
    "payload_too_large": os.EX_DATAERR,
    "unknown_key": os.EX_NOINPUT,
    "unknown_version": os.EX_NOINPUT,
    "backend_unavailable": os.EX_UNAVAILABLE,
    "backend_sealed": os.EX_UNAVAILABLE,
    "audit_unavailable": os.EX_UNAVAILABLE,
    "nonce_store_unavailable": os.EX_UNAVAILABLE,
    "not_supported": os.EX_UNAVAILABLE,
    "internal_error": os.EX_SOFTWARE,
    "outcome_unknown": os.EX_SOFTWARE,
    "idempotency_key_reused": os.EX_DATAERR,
    "key_exists": os.EX_CANTCREAT,
    "shared_peer_key": os.EX_CANTCREAT,
    "rate_limited": os.EX_TEMPFAIL,
    "too_many_connections": os.EX_TEMPFAIL,
    "backend_error": os.EX_TEMPFAIL,
    "malformed_json": os.EX_PROTOCOL,
    "invalid_request": os.EX_PROTOCOL,
    "unsupported_media_type": os.EX_PROTOCOL,
    "method_not_allowed": os.EX_PROTOCOL,
    "not_found": os.EX_PROTOCOL,
    "permission_denied": os.EX_NOPERM,
    "tenant_mismatch": os.EX_NOPERM,
}


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _UsageError(message)


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be > 0 and <= 3600 seconds")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="signerctl", description="Operate signerd over its Unix socket.")
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help=f"signerd's socket (default: $SIGNERD_SOCKET, else {DEFAULT_SOCKET})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON on stdout")
    parser.add_argument("--timeout", type=_timeout, default=10.0, metavar="SECONDS")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _keys.add_commands(sub)  # keys ..., sign, verify
    _federation.add_commands(sub)  # telemetry, feedback
    _keys.add_lookup_commands(sub)  # jwks, kid, health, ready
    _audit.add_commands(sub)  # audit verify, audit payload-hash
    _status.add_commands(sub)  # status [--watch]
    return parser


def _fail(
    args: argparse.Namespace, code: str, message: str, request_id: str | None, exit_code: int
) -> int:
    suffix = f" (request {request_id})" if request_id else ""
    print(f"signerctl: {code}: {message}{suffix}", file=sys.stderr)
    if args.json:
        error = {"code": code, "message": message, "request_id": request_id}
        print(json.dumps({"error": error}, indent=2))
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        print(f"signerctl: usage: {exc}", file=sys.stderr)
        return os.EX_USAGE
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else os.EX_USAGE
    if getattr(args, "if_any", False) and not args.pending:
        print("signerctl: usage: keys promote: --if-any goes with --pending", file=sys.stderr)
        return os.EX_USAGE
    try:
        offline = getattr(args, "offline", None)
        if offline is not None:  # acts on the token itself, not through the daemon
            return int(offline(args))
        with Client(args.socket or default_socket_path(), timeout=args.timeout) as client:
            doc, text = args.run(client, args)
        if not getattr(args, "printed", False):
            print(json.dumps(doc, indent=2) if args.json else text)
        return int(args.exit_of(doc)) if hasattr(args, "exit_of") else os.EX_OK
    except RequestTimeout as exc:
        return _fail(args, "request_timeout", exc.message, None, os.EX_TEMPFAIL)
    except ConnectionFailed as exc:
        return _fail(args, "connection_failed", exc.message, None, os.EX_UNAVAILABLE)
    except SignerdError as exc:
        exit_code = EXIT_FOR_CODE.get(exc.code, os.EX_SOFTWARE)
        return _fail(args, exc.code, exc.message, exc.request_id, exit_code)
    except Failure as exc:
        return _fail(args, exc.code, exc.message, None, exc.exit_code)
    except _audit.AuditBroken as exc:
        print(json.dumps(exc.doc, indent=2) if args.json else exc.text)
        return os.EX_DATAERR
    except BrokenPipeError:
        return os.EX_IOERR


if __name__ == "__main__":
    sys.exit(main())
