"""signerctl's audit commands, run on the files themselves (the daemon is not asked).

::

    audit verify PATH... [--anchor FILE]... [--no-anchor]
    audit show PATH... [filters]       audit tail PATH... [filters] [--follow]   (_auditshow)
                 [--forwarded FILE --jwks FILE [--host NAME]]
    audit payload-hash --key FILE [--data-file F | --sha256 HEX]  (else payload from stdin)

``audit verify`` exits 0 only for an intact trail; a trail that does not
verify prints its report and exits 65 (``AuditBroken``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
from typing import TYPE_CHECKING, Any

from .._files import MAX_INPUT_BYTES, NotRegularFile, open_regular
from ..audit import VerifyReport
from ..errors import SignerdError
from . import _auditshow
from ._io import Failure, data_of, not_a_file, plain, register

if TYPE_CHECKING:
    from ..client import Client


class AuditBroken(Exception):
    """An audit file that does not verify: its report, as JSON and as text."""

    def __init__(self, doc: Any, text: str) -> None:
        super().__init__(text)
        self.doc = doc
        self.text = text


def _audit_verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    from ..audit import verify_trail

    if (a.forwarded is None) != (a.jwks is None):
        raise Failure(os.EX_USAGE, "usage", "--forwarded and --jwks go together")
    try:
        if a.forwarded is not None:
            report, files = _against_forwarded(a)
        else:
            report, files = verify_trail(a.paths, a.anchor or (), use_anchors=not a.no_anchor)
    except NotRegularFile as exc:
        raise not_a_file(str(exc.filename)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read{where}: {exc.strerror}") from None
    doc = plain(report)
    where = f"{report.path}: " if report.path and files > 1 else ""
    if not report.ok and report.first_bad_line is not None:
        raise AuditBroken(doc, f"{where}broken at line {report.first_bad_line}: {report.problem}")
    if not report.ok:
        raise AuditBroken(doc, f"incomplete: {report.problem}")
    text = f"ok: {report.records} records, chain intact"
    if report.anchors:
        head = report.head_seq
        at = "no record anchored yet" if head is None else f"anchored at seq {head}"
        text += f"; {at} ({report.anchors} anchors checked)"
    return doc, "\n".join([text, *(f"note: {n}" for n in report.notes)])


def _against_forwarded(a: argparse.Namespace) -> tuple[VerifyReport, int]:
    """The trail checked against the signed checkpoints a collector wrote (and the local
    anchors, unless --no-anchor): a checkpoint that does not verify fails the check."""
    from ..audit import audit_files, find_anchors, verify_set
    from ..forwarding import anchors_of, jwks_keys, read_checkpoints
    from ..wire import loads_strict

    with open_regular(a.jwks) as handle:
        raw = handle.read(MAX_INPUT_BYTES + 1)
    try:
        if len(raw) > MAX_INPUT_BYTES:
            raise ValueError("too large")
        keys = jwks_keys(loads_strict(raw))
    except (ValueError, SignerdError):
        raise Failure(os.EX_DATAERR, "invalid_jwks", f"{a.jwks}: not a JWKS document") from None
    checkpoints, problems = read_checkpoints(a.forwarded, keys, a.host)
    if problems:
        raise AuditBroken({"ok": False, "problems": problems}, "forged: " + problems[0])
    if not checkpoints:
        where = f" of host {a.host}" if a.host else ""
        raise AuditBroken(
            {"ok": False, "problems": ["no signed checkpoint"]},
            f"incomplete: {a.forwarded} holds no signed checkpoint{where}",
        )
    local, notes = find_anchors(a.paths, a.anchor or ()) if not a.no_anchor else ([], [])
    files = audit_files(a.paths)
    report = verify_set(files, [*local, *anchors_of(checkpoints)])
    notes.append(f"{len(checkpoints)} signed checkpoints from {a.forwarded} checked")
    return dataclasses.replace(report, notes=report.notes + tuple(notes)), len(files)


def _audit_payload_hash(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    from ..audit import load_key, payload_hmac

    try:
        key = load_key(a.key)
    except NotRegularFile:
        raise not_a_file(a.key) from None
    except OSError as exc:
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read {a.key}: {exc.strerror}") from None
    except ValueError as exc:
        raise Failure(os.EX_DATAERR, "invalid_key", str(exc)) from None
    if a.sha256 is not None:
        if not re.fullmatch(r"[0-9a-f]{64}", a.sha256):
            raise Failure(os.EX_USAGE, "usage", "--sha256: 64 lowercase hex digits")
        digest = a.sha256
    else:
        digest = hashlib.sha256(data_of(a)).hexdigest()
    value = payload_hmac(key, digest)
    return {"payload_sha256": digest, "payload_hmac": value}, value


def add_commands(sub: Any) -> None:
    """Register ``audit verify`` and ``audit payload-hash`` on signerctl's sub-parsers."""
    audit = sub.add_parser("audit", help="audit trail tools")
    asub = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = register(asub, "verify", _audit_verify, "check audit files' hash chains and anchors")
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
    p.add_argument(
        "--forwarded",
        metavar="FILE",
        help="also check against the signed checkpoints in FILE (what the collector wrote)",
    )
    p.add_argument("--jwks", metavar="FILE", help="the JWKS that verifies the checkpoints")
    p.add_argument("--host", metavar="NAME", help="only the checkpoints of this host")
    p = register(
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
    _auditshow.add_commands(asub)
