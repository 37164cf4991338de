"""signerctl: operate signerd from a shell.

::

    signerctl [--socket PATH] [--json] [--timeout SECONDS] COMMAND ...

    keys list [--tenant T]            keys show KEY           keys create KEY
    keys rotate KEY [--pending]       keys promote KEY (VERSION | --pending [--if-any])
    keys retire KEY VERSION           keys destroy KEY VERSION --confirm KID
    sign KEY [--data-file F | --data-b64 B]          (else data from stdin)
    verify KID --signature B64 [--data-file F | --data-b64 B]
    jwks [--tenant T]    kid KID    health    ready
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
                     ``audit verify``: the trail is intact
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
import base64
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .._files import MAX_INPUT_BYTES, NotRegularFile
from ..client import (
    Client,
    ConnectionFailed,
    KeyDescription,
    RequestTimeout,
    VersionState,
    default_socket_path,
)
from ..client._http import DEFAULT_SOCKET
from ..errors import SignerdError
from ._federation import add_commands as add_federation_commands
from ._io import Failure
from ._io import b64_arg as _b64_arg
from ._io import data_of as _data
from ._io import not_a_file as _not_a_file
from ._io import read_input as _read_file

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

Command = Callable[[Client, argparse.Namespace], Any]


class _UsageError(Exception):
    pass


class _AuditBroken(Exception):
    """An audit file that does not verify: its report, as JSON and as text."""

    def __init__(self, doc: Any, text: str) -> None:
        super().__init__(text)
        self.doc = doc
        self.text = text


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise _UsageError(message)


# --- output ---


def _plain(value: Any) -> Any:
    """Results as JSON values, in their wire forms (bytes as standard base64)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _describe(desc: KeyDescription) -> str:
    head = f"key         {desc.key}\nactive kid  {desc.active_kid or '-'}\n\n"
    rows = [["VERSION", "KID", "STATE", "CREATED"]]
    rows += [[str(v.version), v.kid, v.state.value, _when(v.created_at)] for v in desc.versions]
    return head + _table(rows)


# --- commands: each returns (JSON value, human text) ---


def _keys_list(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    keys = c.list_keys(a.tenant)
    rows = [["KEY", "ACTIVE KID", "VERSIONS"]]
    rows += [[d.key, d.active_kid or "-", str(len(d.versions))] for d in keys]
    return {"keys": _plain(keys)}, _table(rows) if keys else "no keys"


def _keys_show(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.get_key(a.key)
    return _plain(desc), _describe(desc)


def _keys_create(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.create_key(a.key)
    return _plain(desc), _describe(desc)


def _keys_rotate(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    kid, desc = c.rotate(a.key, pending=a.pending)
    label = "new pending kid" if a.pending else "new active kid"
    return {"kid": kid, "key": _plain(desc)}, f"{label}: {kid}\n\n{_describe(desc)}"


def _keys_promote(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    version = a.version
    if a.pending:  # the one pending version, found by the key's description
        desc = c.get_key(a.key)
        pending = [v.version for v in desc.versions if v.state is VersionState.PENDING]
        if not pending and a.if_any:
            return _plain(desc), f"no pending version: nothing promoted\n\n{_describe(desc)}"
        if not pending:
            raise Failure(os.EX_NOINPUT, "no_pending_version", f"{a.key} has no pending version")
        if len(pending) > 1:
            listed = ", ".join(str(v) for v in pending)
            raise Failure(
                os.EX_DATAERR,
                "ambiguous_pending",
                f"{a.key} has several pending versions ({listed}): promote one by number",
            )
        version = pending[0]
    desc = c.promote(a.key, version)
    return _plain(desc), _describe(desc)


def _keys_retire(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.retire(a.key, a.version)
    return _plain(desc), _describe(desc)


def _keys_destroy(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.destroy(a.key, a.version, a.confirm)
    return _plain(desc), _describe(desc)


def _sign(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    sig = c.sign(a.key, _data(a))
    return _plain(sig), f"kid        {sig.kid}\nsignature  {_plain(sig.signature)}"


def _verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    signature = _b64_arg(a.signature, "--signature")
    result = c.verify(a.kid, _data(a), signature)
    return _plain(result), f"valid: {result.kid} (key {result.key}, {result.state.value})"


def _jwks(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    keys = c.jwks(a.tenant)
    rows = [["KID", "ALG", "X"]] + [
        [k.get("kid", ""), k.get("alg", ""), k.get("x", "")] for k in keys
    ]
    return {"keys": keys}, _table(rows) if keys else "no keys"


def _kid(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    info = c.kid_info(a.kid)
    rows = [["kid", info.kid], ["key", info.key], ["version", str(info.version)]]
    rows.append(["state", info.state.value])
    return _plain(info), _table(rows) + "\n\n" + info.pem.rstrip()


def _health(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    status = c.health()
    return {"status": status}, status


def _ready(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    status = c.ready()
    return {"status": status}, status


def _audit_verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    from ..audit._chain import verify_file
    from ..audit._check import audit_files, find_anchors, verify_set

    try:  # the anchors before the trail: each one names a head already written
        anchors, notes = ([], []) if a.no_anchor else find_anchors(a.paths, a.anchor or ())
        files = audit_files(a.paths)
        if len(files) == 1 and not anchors and not a.anchor:
            report = verify_file(files[0])  # one file, nothing to check it against: as before
        else:
            report = verify_set(files, anchors)
    except NotRegularFile as exc:
        raise _not_a_file(str(exc.filename)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read{where}: {exc.strerror}") from None
    report = dataclasses.replace(report, notes=report.notes + tuple(notes))
    doc = _plain(report)
    where = f"{report.path}: " if report.path and len(files) > 1 else ""
    if not report.ok and report.first_bad_line is not None:
        raise _AuditBroken(doc, f"{where}broken at line {report.first_bad_line}: {report.problem}")
    if not report.ok:
        raise _AuditBroken(doc, f"incomplete: {report.problem}")
    text = f"ok: {report.records} records, chain intact"
    if report.anchors:
        text += f"; anchored at seq {report.head_seq} ({report.anchors} anchors checked)"
    return doc, "\n".join([text, *(f"note: {n}" for n in report.notes)])


def _audit_payload_hash(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    from ..audit._anchor import load_key, payload_hmac

    try:
        key = load_key(a.key)
    except NotRegularFile:
        raise _not_a_file(a.key) from None
    except OSError as exc:
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read {a.key}: {exc.strerror}") from None
    except ValueError as exc:
        raise Failure(os.EX_DATAERR, "invalid_key", str(exc)) from None
    if a.sha256 is not None:
        if not re.fullmatch(r"[0-9a-f]{64}", a.sha256):
            raise Failure(os.EX_USAGE, "usage", "--sha256: 64 lowercase hex digits")
        digest = a.sha256
    else:
        digest = hashlib.sha256(_data(a)).hexdigest()
    value = payload_hmac(key, digest)
    return {"payload_sha256": digest, "payload_hmac": value}, value


def _keys_purge_invalid(a: argparse.Namespace) -> int:
    """Offline: remove keys with invalid names from each PKCS#11 token of a configuration."""
    from .._config import ConfigError, load
    from ..backends.pkcs11 import purge_invalid

    try:
        removed = purge_invalid(load(a.config).backends, dry_run=a.dry_run)
    except ConfigError as exc:
        return _fail(a, "invalid_config", str(exc), None, os.EX_CONFIG)
    except SignerdError as exc:
        return _fail(a, exc.code, exc.message, None, EXIT_FOR_CODE.get(exc.code, os.EX_SOFTWARE))
    verb = "would remove" if a.dry_run else "removed"
    if a.json:
        print(json.dumps({"dry_run": a.dry_run, "objects": [_plain(r) for r in removed]}, indent=2))
    else:
        for r in removed:
            print(f"{verb} {r.backend} {r.object_class} {r.label} label_sha256={r.label_sha256}")
        print(f"{verb} {len(removed)} object(s)")
    return os.EX_OK


# --- the parser ---


def _data_options(p: argparse.ArgumentParser) -> None:
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

    def command(parent: Any, name: str, run: Command, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text)
        p.set_defaults(run=run)
        return p

    keys = sub.add_parser("keys", help="list, show, create and manage keys and versions")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    command(ksub, "list", _keys_list, "list keys").add_argument("--tenant")
    command(ksub, "show", _keys_show, "show a key's versions").add_argument("key", metavar="KEY")
    command(ksub, "create", _keys_create, "create TENANT/NAME").add_argument("key", metavar="KEY")
    p = command(ksub, "rotate", _keys_rotate, "add the next version")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--pending", action="store_true", help="publish it as pending, not signing yet")
    p = command(ksub, "promote", _keys_promote, "make a pending version active")
    p.add_argument("key", metavar="KEY")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "version", metavar="VERSION", type=int, nargs="?", help="the version (or --pending)"
    )
    which.add_argument(
        "--pending", action="store_true", help="promote the key's one pending version (by state)"
    )
    p.add_argument(
        "--if-any", action="store_true", help="with --pending: no pending version is not an error"
    )
    for name, run, help_text in (
        ("retire", _keys_retire, "stop a version from verifying"),
        ("destroy", _keys_destroy, "remove a retired version's private key for good"),
    ):
        p = command(ksub, name, run, help_text)
        p.add_argument("key", metavar="KEY")
        p.add_argument("version", metavar="VERSION", type=int)
        if name == "destroy":
            p.add_argument(
                "--confirm", metavar="KID", required=True, help="the kid being destroyed"
            )

    p = ksub.add_parser(
        "purge-invalid",
        help="offline: remove keys whose names are invalid from the token (uses the configured PIN)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="signerd's configuration file")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(offline=_keys_purge_invalid)

    p = command(sub, "sign", _sign, "sign data with a key's active version")
    p.add_argument("key", metavar="KEY")
    _data_options(p)
    p = command(sub, "verify", _verify, "verify a signature (exit 0 only when valid)")
    p.add_argument("kid", metavar="KID")
    p.add_argument("--signature", metavar="B64", required=True)
    _data_options(p)
    add_federation_commands(sub, command, _data_options, _data, _b64_arg, _plain, _read_file)
    command(sub, "jwks", _jwks, "public keys as RFC 8037 JWKs").add_argument("--tenant")
    command(sub, "kid", _kid, "what signerd knows of a kid").add_argument("kid", metavar="KID")
    command(sub, "health", _health, "whether signerd answers")
    command(sub, "ready", _ready, "whether signerd can sign (token reachable)")
    audit = sub.add_parser("audit", help="audit trail tools")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = command(asub, "verify", _audit_verify, "check audit files' hash chains and anchors")
    p.add_argument(
        "paths", metavar="PATH", nargs="+", help="audit files, directories or globs (any order)"
    )
    p.add_argument(
        "--anchor",
        metavar="FILE",
        action="append",
        help="anchor file to check against (repeatable; default FILE.anchor, DIR/*.anchor)",
    )
    p.add_argument("--no-anchor", action="store_true", help="check the chains only")
    p = command(
        asub, "payload-hash", _audit_payload_hash, "a payload's payload_hmac, to find it in a trail"
    )
    p.add_argument("--key", metavar="FILE", required=True, help="the trail's key (audit.key)")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--data-file",
        metavar="FILE",
        help=f"read the payload from FILE ('-': stdin), at most {MAX_INPUT_BYTES} bytes",
    )
    group.add_argument(
        "--sha256", metavar="HEX", help="the payload's SHA-256, if that is all you have"
    )
    p.set_defaults(data_b64=None)
    return parser


# --- main ---


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
    offline = getattr(args, "offline", None)
    if offline is not None:  # acts on the token itself, not through the daemon
        return int(offline(args))
    try:
        with Client(args.socket or default_socket_path(), timeout=args.timeout) as client:
            doc, text = args.run(client, args)
        print(json.dumps(doc, indent=2) if args.json else text)
        return os.EX_OK
    except RequestTimeout as exc:
        return _fail(args, "request_timeout", exc.message, None, os.EX_TEMPFAIL)
    except ConnectionFailed as exc:
        return _fail(args, "connection_failed", exc.message, None, os.EX_UNAVAILABLE)
    except SignerdError as exc:
        exit_code = EXIT_FOR_CODE.get(exc.code, os.EX_SOFTWARE)
        return _fail(args, exc.code, exc.message, exc.request_id, exit_code)
    except Failure as exc:
        return _fail(args, exc.code, exc.message, None, exc.exit_code)
    except _AuditBroken as exc:
        print(json.dumps(exc.doc, indent=2) if args.json else exc.text)
        return os.EX_DATAERR
    except BrokenPipeError:
        return os.EX_IOERR


if __name__ == "__main__":
    sys.exit(main())
