"""Write the man pages and shell completions under share/ from the programs' parsers.

signerctl's completions for bash, zsh and fish are made by ``shtab`` and the man pages
of signerctl (section 1) and signerd (section 8) by ``argparse-manpage``, from the
same ``argparse`` parsers the programs use, so they cannot drift: a test checks that
the committed files are what this writes. ``make install`` installs the committed
files (it needs neither tool).

    python -m tests.support.generate           # rewrite share/
    python -m tests.support.generate --check   # exit 1 when share/ is stale
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARE = ROOT / "share"

_MANUAL = "signerd manual"
_SEE_ALSO = {
    "signerctl": ".SH SEE ALSO\n\\fBsignerd\\fR(8); docs/cli.md in signerd's documentation\n",
    "signerd": ".SH SEE ALSO\n\\fBsignerctl\\fR(1); README.md in signerd's documentation\n",
}


def _manpage(parser: argparse.ArgumentParser, section: int, description: str) -> str:
    from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

    import signerd

    data = {
        "project_name": "signerd",
        "version": signerd.__version__,
        "manual_title": _MANUAL,
        "manual_section": section,
        "description": description,
    }
    text = str(Manpage(parser, _data=data))
    # no build date in the page: the same parser gives the same file
    text = re.sub(r'^(\.TH \S+ "\d+") "[^"]*"', r'\1 ""', text, count=1, flags=re.M)
    return text.rstrip("\n") + "\n" + _SEE_ALSO[parser.prog]


def _completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    return str(shtab.complete(parser, shell=shell, root_prefix="signerctl"))


def outputs() -> dict[Path, Callable[[], str]]:
    """Each generated file, and how to make its text (help wrapped at 80 columns, whatever
    the terminal)."""
    os.environ["COLUMNS"] = "80"
    from signerd.cli import build_parser as ctl_parser
    from signerd.daemon._main import build_parser as daemon_parser

    return {
        SHARE / "man" / "signerctl.1": lambda: _manpage(
            ctl_parser(), 1, "operate the signerd signing daemon"
        ),
        SHARE / "man" / "signerd.8": lambda: _manpage(
            daemon_parser(), 8, "Ed25519 signing daemon on a Unix socket"
        ),
        SHARE / "completions" / "signerctl.bash": lambda: _completion(ctl_parser(), "bash"),
        SHARE / "completions" / "_signerctl": lambda: _completion(ctl_parser(), "zsh"),
        SHARE / "completions" / "signerctl.fish": lambda: _completion(ctl_parser(), "fish"),
    }


def stale() -> list[Path]:
    """The generated files whose committed text is not what the parsers give now."""
    return [
        path
        for path, make in outputs().items()
        if not path.exists() or path.read_text(encoding="utf-8") != make()
    ]


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        old = stale()
        for path in old:
            print(f"{path.relative_to(ROOT)} is stale: run python -m tests.support.generate")
        return 1 if old else 0
    if argv:
        print("usage: python -m tests.support.generate [--check]", file=sys.stderr)
        return 2
    for path, make in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
