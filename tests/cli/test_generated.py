"""Man pages and shell completions: generated from the parsers, current, and working."""

from __future__ import annotations

import subprocess

from ..support import generate

ROOT = generate.ROOT


def test_committed_man_pages_and_completions_are_current() -> None:
    """share/ holds what shtab and argparse-manpage make from today's parsers (a parser
    change without `make generated` fails here)."""
    assert generate.stale() == []


def test_generation_notices_a_stale_file(tmp_path: object) -> None:
    """The freshness check can fail: a changed completion file is reported stale."""
    path = generate.SHARE / "completions" / "signerctl.fish"
    original = path.read_text(encoding="utf-8")
    try:
        path.write_text(original + "# edited\n", encoding="utf-8")
        assert generate.stale() == [path]
    finally:
        path.write_text(original, encoding="utf-8")


def _complete(*words: str) -> list[str]:
    script = (
        f"source {generate.SHARE / 'completions' / 'signerctl.bash'}\n"
        'COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE}\n'
        '_shtab_signerctl; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    done = subprocess.run(
        ["bash", "-c", script, "bash", *words], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_completes_commands_and_options() -> None:
    """The bash completion offers sub-commands and each command's options, globals included."""
    assert _complete("signerctl", "wh") == ["whoami"]
    assert "rotate" in _complete("signerctl", "keys", "")
    assert _complete("signerctl", "keys", "rotate", "--dr") == ["--dry-run"]
    assert _complete("signerctl", "audit", "tail", "--fo") == ["--follow"]
    assert _complete("signerctl", "trust", "list", "--js") == ["--json"]


def test_man_pages_render_and_document_every_command() -> None:
    """man renders both pages without warnings; signerctl(1) names every command."""
    from signerd.cli._parser import EXAMPLES

    for page in ("signerctl.1", "signerd.8"):
        done = subprocess.run(
            ["man", "--warnings", "-l", str(generate.SHARE / "man" / page)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        )
        assert done.returncode == 0 and done.stderr == "", done.stderr
        assert "SEE ALSO" in done.stdout
    text = (generate.SHARE / "man" / "signerctl.1").read_text()
    for path in EXAMPLES:
        assert f"signerctl {path}".rstrip() in text.replace("\\-", "-"), path
