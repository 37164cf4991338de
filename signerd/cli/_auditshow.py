"""``signerctl audit show`` and ``audit tail``: the trail in human form, filtered.

::

    audit show PATH... [filters]
    audit tail PATH... [filters] [-n N] [--follow [--interval S]]

    filters: --since T --until T --tenant T --key PATTERN --kid KID --caller UID|USER
             --unit PATTERN --operation OP --outcome ok|refused|CODE --code CODE
             (each but --since, --until, --outcome repeatable: any of the values)

PATH: audit files, directories (their ``*.jsonl*`` files) or globs; the records of
all of them (one file per worker, rotated files) are merged in time order. Times are
RFC 3339 (UTC when no zone is given), unix seconds, or an age (``30m``, ``24h``,
``7d``). ``--json`` prints each record as one JSON line (the record as written, with
``file`` added). Lines that are not records are skipped and counted on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import deque
from typing import Any

from .._files import NotRegularFile
from ._io import Failure, not_a_file
from ._trail import Filter, Skipped, Source, as_json_line, human, merged, parse_when

_OUTCOME_HELP = "ok, refused (answered with an error), intent, or an error code"


def _filter(a: argparse.Namespace) -> Filter:
    try:
        since = parse_when(a.since) if a.since is not None else None
        until = parse_when(a.until) if a.until is not None else None
    except ValueError as exc:
        raise Failure(os.EX_USAGE, "usage", str(exc)) from None
    return Filter(
        since=since,
        until=until,
        tenants=tuple(a.tenant or ()),
        keys=tuple(a.key or ()),
        kids=tuple(a.kid or ()),
        callers=tuple(a.caller or ()),
        units=tuple(a.unit or ()),
        operations=tuple(a.operation or ()),
        outcome=a.outcome,
        codes=tuple(a.code or ()),
    )


def _files(a: argparse.Namespace) -> list[str]:
    from ..audit import audit_files

    try:
        return audit_files(a.paths)
    except NotRegularFile as exc:
        raise not_a_file(str(exc.filename)) from None
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read{where}: {exc.strerror}") from None


def _print(a: argparse.Namespace, rec: dict[str, Any]) -> None:
    print(as_json_line(rec) if a.json else human(rec))


def _report(skipped: Skipped) -> None:
    if skipped.count:
        first = ", ".join(skipped.where)
        print(f"signerctl: note: {skipped.count} lines are not records ({first})", file=sys.stderr)


def audit_show(a: argparse.Namespace) -> int:
    """Print every record of the files that passes the filters, oldest first."""
    wanted, skipped = _filter(a), Skipped()
    try:
        for rec in merged(_files(a), skipped):
            if wanted(rec):
                _print(a, rec)
    except NotRegularFile as exc:
        raise not_a_file(str(exc.filename)) from None
    except OSError as exc:
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read: {exc.strerror}") from None
    _report(skipped)
    return os.EX_OK


def _drain(source: Source, skipped: Skipped, keep: deque[dict[str, Any]], wanted: Filter) -> None:
    while True:
        records, more = source.read(skipped)
        keep.extend(r for r in records if wanted(r))
        if not more:
            return


def _when(rec: dict[str, Any]) -> float:
    t = rec.get("time")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else 0.0


def audit_tail(a: argparse.Namespace) -> int:
    """The last N records that pass the filters; with --follow, then each new one."""
    wanted, skipped = _filter(a), Skipped()
    sources = {p: Source(p) for p in _files(a)}
    last: deque[dict[str, Any]] = deque(maxlen=a.lines)
    try:
        for source in sources.values():
            mine: deque[dict[str, Any]] = deque(maxlen=a.lines)
            _drain(source, skipped, mine, wanted)
            last.extend(mine)
        for rec in sorted(last, key=_when)[-a.lines :] if a.lines else []:
            _print(a, rec)
        _report(skipped)
        if not a.follow:
            return os.EX_OK
        sys.stdout.flush()
        while True:
            time.sleep(a.interval)
            try:
                for path in _files(a):
                    if path not in sources:  # a file that appeared since: read it whole
                        sources[path] = Source(path)
            except Failure:
                pass  # no file there right now (rotation): follow those already known
            new: deque[dict[str, Any]] = deque()
            for source in sources.values():
                _drain(source, skipped, new, wanted)
            for rec in sorted(new, key=_when):
                _print(a, rec)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return os.EX_OK
    except NotRegularFile as exc:
        raise not_a_file(str(exc.filename)) from None
    except OSError as exc:
        raise Failure(os.EX_NOINPUT, "no_input", f"cannot read: {exc.strerror}") from None


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.05 <= value <= 60:
        raise argparse.ArgumentTypeError("must be >= 0.05 and <= 60 seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 1_000_000:
        raise argparse.ArgumentTypeError("a number of records, 0 to 1000000")
    return int(text)


def add_commands(asub: Any) -> None:
    """Register ``audit show`` and ``audit tail`` on the ``audit`` sub-parsers."""
    show = asub.add_parser("show", help="the trail in human form (or JSON lines), filtered")
    show.set_defaults(offline=audit_show)
    tail = asub.add_parser("tail", help="the last records, and with --follow each new one")
    tail.set_defaults(offline=audit_tail)
    for p in (show, tail):
        p.add_argument("paths", metavar="PATH", nargs="+", help="audit files, directories or globs")
        p.add_argument("--since", metavar="TIME", help="from this time (RFC 3339, unix, 24h)")
        p.add_argument("--until", metavar="TIME", help="up to this time")
        p.add_argument("--tenant", action="append", help="this tenant's records")
        p.add_argument("--key", action="append", metavar="PATTERN", help="TENANT/NAME (glob)")
        p.add_argument("--kid", action="append", help="this kid's records")
        p.add_argument("--caller", action="append", metavar="UID|USER", help="the caller")
        p.add_argument("--unit", action="append", metavar="PATTERN", help="the caller's unit")
        p.add_argument("--operation", action="append", metavar="OP", help="sign, verify, ...")
        p.add_argument("--outcome", help=_OUTCOME_HELP)
        p.add_argument("--code", action="append", help="refusals with this error code")
    tail.add_argument(
        "-n", "--lines", type=_count, default=10, metavar="N", help="how many (default 10)"
    )
    tail.add_argument("--follow", "-f", action="store_true", help="then print each new record")
    tail.add_argument(
        "--interval", type=_interval, default=0.5, metavar="S", help="poll period (default 0.5)"
    )
