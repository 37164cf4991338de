"""signerctl's start-up and its command line: version, lazy imports, global options, help."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest

import signerd
from signerd.cli import build_parser, field_of, main
from signerd.cli._io import Failure
from signerd.cli._parser import DEFAULT_SOCKET, EXAMPLES, walk

from ..conftest import ROOT, DaemonProcess


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


_MODULES_AFTER = """
import contextlib, io, json, sys
from signerd.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main({argv!r})
print(json.dumps({{"code": code, "out": out.getvalue(),
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] == "aiohttp")}}))
"""


def test_the_version_has_one_source() -> None:
    """pyproject declares the version dynamic and reads it from signerd.__version__, so the
    wheel's metadata and --version cannot disagree (the wheel's own metadata is checked where
    the wheel is built, in tests/test_packaging.py)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "signerd.__version__"}
    assert signerd.__version__.count(".") == 2


@pytest.mark.parametrize(("module", "prog"), [("signerd", "signerd"), ("signerd.cli", "signerctl")])
def test_both_commands_print_their_version(module: str, prog: str) -> None:
    """signerd --version and signerctl --version print the program and version, exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", module, "--version"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{prog} {signerd.__version__}\n", "")


def test_signerctl_version_does_not_import_aiohttp() -> None:
    """signerctl --version imports no aiohttp (the synchronous CLI never uses it)."""
    proc = _python(_MODULES_AFTER.format(argv=["--version"]))
    assert proc.returncode == 0, proc.stderr
    done = json.loads(proc.stdout)
    assert done["code"] == 0 and done["out"] == f"signerctl {signerd.__version__}\n"
    assert done["modules"] == []


def test_a_command_against_the_daemon_does_not_import_aiohttp(daemon: DaemonProcess) -> None:
    """A real call (health, whoami) goes through the sync client without importing aiohttp."""
    for argv in (["health"], ["--json", "whoami"]):
        full = ["--socket", str(daemon.socket_path), *argv]
        proc = _python(_MODULES_AFTER.format(argv=full))
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout)
        assert done["code"] == 0 and done["out"]
        assert done["modules"] == []


def test_the_help_socket_default_is_the_clients() -> None:
    """The socket named in the help (the client is not imported for it) is the client's default."""
    from signerd.client import DEFAULT_SOCKET as CLIENT_DEFAULT

    assert DEFAULT_SOCKET == CLIENT_DEFAULT


def test_every_command_help_shows_an_example_and_the_exit_codes() -> None:
    """Each command's --help ends with an example of it and the exit-code table."""
    paths = []
    for path, parser in walk(build_parser()):
        paths.append(path)
        text = parser.format_help()
        assert f"example:\n  {EXAMPLES[path]}\n" in text, path
        assert "exit codes:\n  0 " in text and "\n  66  no such key, version or kid" in text
        assert "--timeout SECONDS" in text and "how long to wait" in text, path
    assert set(paths) == set(EXAMPLES)  # no example for a command that does not exist
    for path in paths:
        assert f"signerctl {path}" in EXAMPLES[path], path  # the example runs the command


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "--socket", "{sock}", "keys", "list"],
        ["keys", "list", "--json", "--socket", "{sock}"],
        ["keys", "--socket", "{sock}", "list", "--json"],
        ["--socket", "/nonexistent.sock", "keys", "list", "--socket", "{sock}", "--json"],
    ],
)
def test_global_options_before_or_after_the_command(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """--json and --socket work before the command, after it, or between its words; the one
    given last (after the command) wins."""
    filled = [a.format(sock=daemon.socket_path) for a in argv]
    capsys.readouterr()
    assert main(filled) == 0
    assert "keys" in json.loads(capsys.readouterr().out)


def test_field_prints_one_field_raw(
    daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """--field prints a string field without quotes (so $(...) captures the value), nested
    fields by dots, and a field the answer lacks exits 64 naming the fields it has."""
    sock = str(daemon.socket_path)
    capsys.readouterr()
    assert main(["--socket", sock, "health", "--field", "status"]) == 0
    assert capsys.readouterr().out == "ok\n"
    assert main(["--socket", sock, "whoami", "--field", "peer.uid"]) == 0
    assert capsys.readouterr().out == f"{os.getuid()}\n"
    assert main(["--socket", sock, "--field", "nope", "health"]) == os.EX_USAGE
    err = capsys.readouterr().err
    assert err.startswith("signerctl: no_such_field: ") and "(fields: status)" in err
    assert main(["audit", "show", "/nonexistent", "--field", "x"]) == os.EX_USAGE
    assert "--field picks from signerd's answers only" in capsys.readouterr().err


def test_field_of_walks_objects_and_lists() -> None:
    """field_of: strings raw, other values as JSON, list items by index; a miss is a Failure."""
    doc = {"a": {"b": [{"c": "x"}, 2]}, "n": None}
    assert field_of(doc, "a.b.0.c") == "x"
    assert field_of(doc, "a.b.1") == "2"
    assert field_of(doc, "n") == "null"
    with pytest.raises(Failure):
        field_of(doc, "a.b.2")
