"""signerctl's key commands: the keyring, signatures and public keys.

::

    keys list [--tenant T]            keys show KEY           keys create KEY
    keys rotate KEY [--pending]       keys promote KEY (VERSION | --pending [--if-any])
    keys retire KEY VERSION           keys destroy KEY VERSION [--now --confirm KID]
    keys cancel-deletion KEY VERSION
    keys purge-invalid --config FILE [--dry-run]              (offline, on the token)
    sign KEY [--data-file F | --data-b64 B]          (else data from stdin)
    verify KID --signature B64 [--data-file F | --data-b64 B]
    jwks [--tenant T]    kid KID    health    ready

Each command returns (JSON value, human text); ``main`` prints one of them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import TYPE_CHECKING, Any

from ._io import Failure, b64_arg, data_of, data_options, plain, register, table

if TYPE_CHECKING:
    from ..client import Client, KeyDescription


def _when(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def age(seconds: float) -> str:
    """A duration, coarsely: 42s, 5m, 3h12m, 4d3h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _maybe(ts: int | None) -> str:
    return "-" if ts is None else _when(ts)


def _due(desc: KeyDescription) -> str:
    """When the key's rotation is due (``keys.max_active_age``), flagged when overdue."""
    due = desc.rotation_due
    if due is None:
        return "-"
    return _when(due.at) + (" OVERDUE" if due.overdue else "")


def _describe(desc: KeyDescription) -> str:
    now = time.time()
    head = f"key           {desc.key}\n"
    if desc.algorithm:
        head += f"algorithm     {desc.algorithm}\n"
    if desc.backend:
        head += f"backend       {desc.backend}\n"
    head += f"active kid    {desc.active_kid or '-'}\n"
    head += f"rotation due  {_due(desc)}\n\n"
    columns = "VERSION KID STATE CREATED AGE STATE_CHANGED DELETION_AT"
    rows = [[*(c.replace("_", " ") for c in columns.split()), "THUMBPRINT (RFC 7638)"]]
    rows += [
        [
            str(v.version),
            v.kid,
            v.state.value,
            _when(v.created_at),
            age(now - v.created_at),
            _maybe(v.state_changed_at),
            _maybe(v.deletion_at),
            v.thumbprint or "-",
        ]
        for v in desc.versions
    ]
    uris = [f"  {v.kid}  {v.pkcs11_uri}" for v in desc.versions if v.pkcs11_uri]
    tail = "\n\nPKCS#11 objects (RFC 7512):\n" + "\n".join(uris) if uris else ""
    return head + table(rows) + tail


# --- keys ---


def _keys_list(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    keys = c.list_keys(a.tenant)
    now = time.time()
    rows = [["KEY", "BACKEND", "ACTIVE KID", "ACTIVE AGE", "ROTATION DUE", "VERSIONS"]]
    for d in keys:
        active = [v for v in d.versions if v.kid == d.active_kid]
        since = age(now - active[0].created_at) if active else "-"
        count = str(len(d.versions))
        rows.append([d.key, d.backend or "-", d.active_kid or "-", since, _due(d), count])
    return {"keys": plain(keys)}, table(rows) if keys else "no keys"


def _keys_show(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.get_key(a.key)
    return plain(desc), _describe(desc)


def _keys_create(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.create_key(a.key)
    return plain(desc), _describe(desc)


def _dry(desc: KeyDescription, changes: list[dict[str, Any]], notes: list[str]) -> tuple[Any, str]:
    """What a change would do: nothing is sent but the read of the key's description."""
    doc = {"dry_run": True, "key": desc.key, "changes": changes, "notes": notes}
    lines = [f"dry run: nothing changed on {desc.key}"]
    for ch in changes:
        before = ch["from"] or "(new)"
        at = f" at {_when(ch['deletion_at'])}" if ch.get("deletion_at") is not None else ""
        lines.append(f"  version {ch['version']}  {ch['kid']}  {before} -> {ch['to']}{at}")
    return doc, "\n".join(lines + [f"note: {n}" for n in notes])


def _change(v: int, kid: str, old: str | None, new: str, **more: Any) -> dict[str, Any]:
    return {"version": v, "kid": kid, "from": old, "to": new, **more}


def _version_of(desc: KeyDescription, version: int, allowed: set[str], why: str) -> Any:
    found = [v for v in desc.versions if v.version == version]
    if not found:
        raise Failure(
            os.EX_NOINPUT, "unknown_version", f"key {desc.key} version {version}: no such version"
        )
    if found[0].state.value not in allowed:
        state = found[0].state.value
        raise Failure(os.EX_DATAERR, "invalid_state", f"version {version} is {state}: {why}")
    return found[0]


def _rotate_dry(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    desc = c.get_key(a.key)
    number = max(v.version for v in desc.versions) + 1
    tenant, name = desc.key.split("/")
    changes = [
        _change(number, f"{tenant}.{name}.v{number}", None, "pending" if a.pending else "active")
    ]
    notes = []
    if not a.pending:
        changes += [
            _change(v.version, v.kid, "active", "verify-only")
            for v in desc.versions
            if v.state.value == "active"
        ]
        notes.append("older verify-only versions beyond keys.retain_verify_only are retired")
    return _dry(desc, changes, notes)


def _keys_rotate(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    if a.dry_run:
        return _rotate_dry(c, a)
    kid, desc = c.rotate(a.key, pending=a.pending)
    label = "new pending kid" if a.pending else "new active kid"
    return {"kid": kid, "key": plain(desc)}, f"{label}: {kid}\n\n{_describe(desc)}"


def _keys_promote(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    version = a.version
    if a.pending:  # the one pending version, found by the key's description
        desc = c.get_key(a.key)
        pending = [v.version for v in desc.versions if v.state.value == "pending"]
        if not pending and a.if_any:
            return plain(desc), f"no pending version: nothing promoted\n\n{_describe(desc)}"
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
    return plain(desc), _describe(desc)


def _keys_retire(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    if a.dry_run:
        desc = c.get_key(a.key)
        why = "only a pending or verify-only version can be retired"
        v = _version_of(desc, a.version, {"pending", "verify-only"}, why)
        return _dry(desc, [_change(v.version, v.kid, v.state.value, "retired")], [])
    desc = c.retire(a.key, a.version)
    return plain(desc), _describe(desc)


def _keys_destroy(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    if a.dry_run:
        return _destroy_dry(c.get_key(a.key), a)
    if a.now and a.confirm is None:
        raise Failure(os.EX_USAGE, "usage", "keys destroy --now: give --confirm KID (or --dry-run)")
    desc = c.destroy(a.key, a.version, a.confirm, now=a.now)
    if a.now:
        return plain(desc), _describe(desc)
    found = [v for v in desc.versions if v.version == a.version]
    when = _maybe(found[0].deletion_at if found else None)
    return plain(desc), f"deletion scheduled at {when}\n\n{_describe(desc)}"


def _destroy_dry(desc: KeyDescription, a: argparse.Namespace) -> tuple[Any, str]:
    if a.now:
        why = "only a retired or pending_deletion version can be destroyed"
        v = _version_of(desc, a.version, {"retired", "pending_deletion"}, why)
        note = f"to destroy it: keys destroy {desc.key} {v.version} --now --confirm {v.kid}"
        return _dry(desc, [_change(v.version, v.kid, v.state.value, "destroyed")], [note])
    why = "only a retired version can be scheduled for deletion"
    v = _version_of(desc, a.version, {"retired"}, why)
    wait = desc.deletion_wait
    at = None if wait is None else int(time.time() + wait)
    notes = ["the daemon destroys it then; keys cancel-deletion puts it back to retired"]
    if at is None:
        notes.insert(0, "the daemon does not say its keys.deletion_wait: time unknown")
    return _dry(
        desc, [_change(v.version, v.kid, "retired", "pending_deletion", deletion_at=at)], notes
    )


def _keys_cancel_deletion(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    if a.dry_run:
        desc = c.get_key(a.key)
        why = "only a version pending deletion can have its deletion cancelled"
        v = _version_of(desc, a.version, {"pending_deletion"}, why)
        return _dry(desc, [_change(v.version, v.kid, "pending_deletion", "retired")], [])
    desc = c.cancel_deletion(a.key, a.version)
    return plain(desc), _describe(desc)


def _keys_purge_invalid(a: argparse.Namespace) -> int:
    """Offline: remove keys with invalid names from each PKCS#11 token of a configuration."""
    from .._config import ConfigError, load
    from ..backends.pkcs11 import purge_invalid

    try:
        removed = purge_invalid(load(a.config).backends, dry_run=a.dry_run)
    except ConfigError as exc:
        raise Failure(os.EX_CONFIG, "invalid_config", str(exc)) from None
    verb = "would remove" if a.dry_run else "removed"
    if a.json:
        print(json.dumps({"dry_run": a.dry_run, "objects": [plain(r) for r in removed]}, indent=2))
    else:
        for r in removed:
            print(f"{verb} {r.backend} {r.object_class} {r.label} label_sha256={r.label_sha256}")
        print(f"{verb} {len(removed)} object(s)")
    return os.EX_OK


# --- signatures and public keys ---


def _sign(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    sig = c.sign(a.key, data_of(a))
    return plain(sig), f"kid        {sig.kid}\nsignature  {plain(sig.signature)}"


def _verify(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    signature = b64_arg(a.signature, "--signature")
    result = c.verify(a.kid, data_of(a), signature)
    return plain(result), f"valid: {result.kid} (key {result.key}, {result.state.value})"


def _jwks(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    keys = c.jwks(a.tenant)
    rows = [["KID", "ALG", "X"]] + [
        [k.get("kid", ""), k.get("alg", ""), k.get("x", "")] for k in keys
    ]
    return {"keys": keys}, table(rows) if keys else "no keys"


def _kid(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    info = c.kid_info(a.kid)
    rows = [["kid", info.kid], ["key", info.key], ["version", str(info.version)]]
    rows.append(["state", info.state.value])
    return plain(info), table(rows) + "\n\n" + info.pem.rstrip()


def _health(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    status = c.health()
    return {"status": status}, status


def _ready(c: Client, a: argparse.Namespace) -> tuple[Any, str]:
    status = c.ready()
    return {"status": status}, status


# --- the parsers ---


def add_commands(sub: Any) -> None:
    """Register ``keys``, ``sign`` and ``verify`` on signerctl's sub-parsers."""
    keys = sub.add_parser("keys", help="list, show, create and manage keys and versions")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    register(ksub, "list", _keys_list, "list keys").add_argument("--tenant")
    register(ksub, "show", _keys_show, "show a key's versions").add_argument("key", metavar="KEY")
    register(ksub, "create", _keys_create, "create TENANT/NAME").add_argument("key", metavar="KEY")
    p = register(ksub, "rotate", _keys_rotate, "add the next version")
    p.add_argument("key", metavar="KEY")
    p.add_argument("--pending", action="store_true", help="publish it as pending, not signing yet")
    p.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    p = register(ksub, "promote", _keys_promote, "make a pending version active")
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
        ("destroy", _keys_destroy, "schedule a retired version's deletion (--now: at once)"),
        ("cancel-deletion", _keys_cancel_deletion, "put a version pending deletion back"),
    ):
        p = register(ksub, name, run, help_text)
        p.add_argument("key", metavar="KEY")
        p.add_argument("version", metavar="VERSION", type=int)
        p.add_argument(
            "--dry-run", action="store_true", help="show what would change; change nothing"
        )
        if name == "destroy":
            p.add_argument(
                "--now",
                action="store_true",
                help="destroy at once, no waiting period (needs --confirm)",
            )
            p.add_argument("--confirm", metavar="KID", help="the kid being destroyed (with --now)")

    p = ksub.add_parser(
        "purge-invalid",
        help="offline: remove keys whose names are invalid from the token (uses the configured PIN)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="signerd's configuration file")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.set_defaults(offline=_keys_purge_invalid)

    p = register(sub, "sign", _sign, "sign data with a key's active version")
    p.add_argument("key", metavar="KEY")
    data_options(p)
    p = register(sub, "verify", _verify, "verify a signature (exit 0 only when valid)")
    p.add_argument("kid", metavar="KID")
    p.add_argument("--signature", metavar="B64", required=True)
    data_options(p)


def add_lookup_commands(sub: Any) -> None:
    """Register ``jwks``, ``kid``, ``health`` and ``ready`` on signerctl's sub-parsers."""
    register(sub, "jwks", _jwks, "public keys as RFC 8037 JWKs").add_argument("--tenant")
    p = register(sub, "kid", _kid, "what signerd knows of a kid (exit 66: no such kid)")
    p.add_argument("kid", metavar="KID")
    p.set_defaults(exit_for={"unknown_kid": os.EX_NOINPUT})
    register(sub, "health", _health, "whether signerd answers")
    register(sub, "ready", _ready, "whether signerd can sign (token reachable)")
