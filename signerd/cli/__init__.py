"""signerctl: operate signerd from a shell.

::

    signerctl [--socket PATH] [--json] [--timeout SECONDS] [--field NAME] COMMAND ...
    signerctl --version

    keys list [--tenant T]            keys show KEY           keys create KEY
    keys rotate KEY [--pending] [--dry-run]
    keys promote KEY (VERSION | --pending [--if-any])
    keys retire KEY VERSION [--dry-run]
    keys destroy KEY VERSION [--now --confirm KID] [--dry-run]   (schedules; --now: at once)
    keys cancel-deletion KEY VERSION [--dry-run]
    sign KEY [--data-file F | --data-b64 B]          (else data from stdin)
    verify KID --signature B64 [--data-file F | --data-b64 B]
    jwks [--tenant T]    kid KID    health    ready    whoami
    trust list [--tenant T]    trust add --tenant T --kid KID --jwk-file F    trust remove KID
    status [--watch [--interval SECONDS] [--count N]]
    audit verify PATH... [--anchor FILE]... [--no-anchor]
    audit show PATH... [filters]      audit tail PATH... [filters] [--follow]
    audit payload-hash --key FILE [--data-file F | --sha256 HEX]  (else payload from stdin)
    telemetry sign|verify ...    feedback sign|verify ...

The global options may come before or after the command. ``--field NAME``
prints one field of the JSON answer, raw (``SIG=$(signerctl sign --field
signature KEY < file)``). ``--socket`` defaults to ``$SIGNERD_SOCKET``, else ``/run/signerd/signerd.sock``.
``--json`` prints the answer as JSON on stdout (the wire forms: ``signerctl
--json jwks`` is a JWKS document); otherwise plain tables. An error prints
``signerctl: CODE: OBJECT: MESSAGE (request ID)`` on stderr (OBJECT: what
signerctl sent, e.g. ``key acme/x``; the daemon does not echo it) (and, with ``--json``,
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
66   EX_NOINPUT      unknown_key, unknown_version; unknown_kid of ``kid``
                     (a lookup; ``verify`` of an unknown kid is 65); a file that cannot be read
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
from typing import Any

from .. import __version__
from ..errors import SignerdError
from . import _audit, _federation, _keys, _parser, _status, _trust
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


def build_parser() -> argparse.ArgumentParser:
    parser = _parser.Parser(prog="signerctl", description="Operate signerd over its Unix socket.")
    parser.add_argument("--version", action="version", version=f"signerctl {__version__}")
    _parser.add_globals(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _keys.add_commands(sub)  # keys ..., sign, verify
    _federation.add_commands(sub)  # telemetry, feedback
    _keys.add_lookup_commands(sub)  # jwks, kid, health, ready
    _trust.add_commands(sub)  # whoami, trust ...
    _audit.add_commands(sub)  # audit verify, show, tail, payload-hash
    _status.add_commands(sub)  # status [--watch]
    _parser.finish(parser)
    return parser


def _object(args: argparse.Namespace) -> str:
    """What the command named, as signerctl sent it (the daemon does not echo it)."""
    for attr, label in (("key", "key"), ("kid", "kid")):
        value = getattr(args, attr, None)
        if isinstance(value, str) and value:
            version = getattr(args, "version", None)
            return f"{label} {value}" + (f" version {version}" if version is not None else "")
    return ""


def _fail(
    args: argparse.Namespace,
    code: str,
    message: str,
    request_id: str | None,
    exit_code: int,
    what: str = "",
) -> int:
    suffix = f" (request {request_id})" if request_id else ""
    prefix = f"{what}: " if what else ""
    print(f"signerctl: {code}: {prefix}{message}{suffix}", file=sys.stderr)
    if args.json:
        error = {"code": code, "message": message, "request_id": request_id}
        print(json.dumps({"error": error}, indent=2))
    return exit_code


def field_of(doc: Any, name: str) -> str:
    """One field of an answer, raw: a string as is, anything else as compact JSON."""
    value = doc
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            fields = ", ".join(sorted(value)) if isinstance(value, dict) else "none"
            raise Failure(
                os.EX_USAGE, "no_such_field", f"the answer has no field {part!r} (fields: {fields})"
            )
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _output(args: argparse.Namespace, doc: Any, text: str) -> str:
    if args.field is not None:
        return field_of(doc, args.field)
    return json.dumps(doc, indent=2) if args.json else text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _parser.UsageError as exc:
        print(f"signerctl: usage: {exc}", file=sys.stderr)
        return os.EX_USAGE
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else os.EX_USAGE
    if getattr(args, "if_any", False) and not args.pending:
        print("signerctl: usage: keys promote: --if-any goes with --pending", file=sys.stderr)
        return os.EX_USAGE
    try:
        offline = getattr(args, "offline", None)
        if offline is not None:  # acts on files or the token itself, not through the daemon
            if args.field is not None:
                raise Failure(os.EX_USAGE, "usage", "--field picks from signerd's answers only")
            return int(offline(args))
        from ..client import Client, ConnectionFailed, RequestTimeout, default_socket_path
    except Failure as exc:
        return _fail(args, exc.code, exc.message, None, exc.exit_code)
    except _audit.AuditBroken as exc:
        print(json.dumps(exc.doc, indent=2) if args.json else exc.text)
        return os.EX_DATAERR
    except BrokenPipeError:
        return os.EX_IOERR
    try:
        with Client(args.socket or default_socket_path(), timeout=args.timeout) as client:
            doc, text = args.run(client, args)
        if not getattr(args, "printed", False):
            print(_output(args, doc, text))
        return int(args.exit_of(doc)) if hasattr(args, "exit_of") else os.EX_OK
    except RequestTimeout as exc:
        return _fail(args, "request_timeout", exc.message, None, os.EX_TEMPFAIL)
    except ConnectionFailed as exc:
        return _fail(args, "connection_failed", exc.message, None, os.EX_UNAVAILABLE)
    except SignerdError as exc:
        exits = {**EXIT_FOR_CODE, **getattr(args, "exit_for", {})}
        exit_code = exits.get(exc.code, os.EX_SOFTWARE)
        return _fail(args, exc.code, exc.message, exc.request_id, exit_code, _object(args))
    except Failure as exc:
        return _fail(args, exc.code, exc.message, None, exc.exit_code)
    except _audit.AuditBroken as exc:
        print(json.dumps(exc.doc, indent=2) if args.json else exc.text)
        return os.EX_DATAERR
    except BrokenPipeError:
        return os.EX_IOERR


if __name__ == "__main__":
    sys.exit(main())
