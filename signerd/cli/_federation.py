"""signerctl's federation envelope commands (``docs/federation.md``).

::

    telemetry sign KEY [--data-file F | --data-b64 B]           (else body from stdin)
    telemetry verify --tenant T --kid KID --timestamp TS --nonce N --signature B64
                     [--attestation H] [--data-file F | --data-b64 B]
    feedback sign KEY --schema S [--data-file F]                (JSON data; else stdin)
    feedback verify --schema S [--attestation H] [--envelope-file F]   (else stdin)

``feedback sign`` prints the envelope as JSON (it is what a gateway sends);
``feedback verify`` reads one. JSON read here is parsed strictly (duplicate
members, NaN, numbers beyond +-(2^53 - 1) however written: ``malformed_json``). Verification exits 0
only for an accepted envelope, whose nonce is then spent.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequest
from ._io import b64_arg, data_of, data_options, plain, read_input, register

if TYPE_CHECKING:
    from ..client import Client


def _telemetry_sign(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    sig = c.telemetry_sign(a.key, data_of(a))
    doc = {
        "kid": sig.kid,
        "timestamp": str(sig.timestamp),
        "nonce": sig.nonce,
        "signature": plain(sig.signature),
    }
    return doc, "\n".join(f"{k:<10} {v}" for k, v in doc.items())


def _telemetry_verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    signature = b64_arg(a.signature, "--signature")
    ok = c.telemetry_verify(
        a.tenant, a.kid, a.timestamp, a.nonce, data_of(a), signature, attestation=a.attestation
    )
    return plain(ok), f"valid: {ok.kid} (tenant {ok.tenant}, {ok.source})"


def _json_in(a: argparse.Namespace, attr: str) -> Any:
    path = getattr(a, attr)
    if path is None and (sys.stdin is None or sys.stdin.isatty()):
        raise InvalidRequest(f"no JSON: give --{attr.replace('_', '-')} or pipe it on stdin")
    from ..wire import loads_strict

    return loads_strict(read_input(path if path is not None else "-"))


def _feedback_sign(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    envelope = c.feedback_sign(a.key, a.schema, _json_in(a, "data_file")).to_json()
    return envelope, json.dumps(envelope, indent=2)


def _feedback_verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    envelope = _json_in(a, "envelope_file")
    if not isinstance(envelope, dict):
        raise InvalidRequest("the envelope must be a JSON object")
    ok = c.feedback_verify(envelope, a.schema, attestation=a.attestation)
    return plain(ok), f"valid: {ok.kid} (tenant {ok.tenant}, {ok.source})"


def add_commands(sub: Any) -> None:
    """Register ``telemetry`` and ``feedback`` on signerctl's sub-parsers."""
    tel = sub.add_parser("telemetry", help="sign and verify telemetry envelopes")
    tsub = tel.add_subparsers(dest="telemetry_command", required=True, metavar="ACTION")
    p = register(tsub, "sign", _telemetry_sign, "sign a telemetry body (signerd picks time, nonce)")
    p.add_argument("key", metavar="KEY")
    data_options(p)
    p = register(tsub, "verify", _telemetry_verify, "verify telemetry (exit 0 only when accepted)")
    for name in ("tenant", "kid", "timestamp", "signature"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--nonce", required=True, help="write --nonce=N: a nonce may start with '-'")
    p.add_argument("--attestation", metavar="sha256:HEX")
    data_options(p)

    fb = sub.add_parser("feedback", help="sign and verify feedback envelopes")
    fsub = fb.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    p = register(fsub, "sign", _feedback_sign, "sign JSON data as feedback; prints the envelope")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--schema", required=True)
    p.add_argument("--data-file", metavar="FILE", help="the JSON data ('-': stdin; at most 1 MiB)")
    p = register(fsub, "verify", _feedback_verify, "verify an envelope (exit 0 only when accepted)")
    p.add_argument("--schema", required=True, help="the schema the envelope must have")
    p.add_argument("--attestation", metavar="sha256:HEX")
    p.add_argument(
        "--envelope-file", metavar="FILE", help="the envelope JSON ('-': stdin; at most 1 MiB)"
    )
