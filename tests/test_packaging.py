"""Packaging: the license, the wheel and sdist, what make installs, and the docs site."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import signerd

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_matches_pyproject() -> None:
    """LICENSE is the Apache License 2.0, named in pyproject as an SPDX expression."""
    text = " ".join((ROOT / "LICENSE").read_text().split())
    assert text.startswith("Apache License Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # a string (PEP 639), not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]  # PEP 639 support


@pytest.mark.timeout(600)
def test_wheel_and_sdist_carry_the_license(tmp_path: Path) -> None:
    """`python -m build` (what make dist runs) makes a wheel and an sdist with the license."""
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("signerd-*-py3-none-any.whl")
    (sdist,) = tmp_path.glob("signerd-*.tar.gz")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        headers = z.read(metadata).decode().split("\n\n")[0].splitlines()
        assert "License-Expression: Apache-2.0" in headers
        assert f"Version: {signerd.__version__}" in headers
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
        assert "signerd/openapi.json" in names and "signerd/py.typed" in names
    with tarfile.open(sdist) as t:
        assert any(n.endswith("/LICENSE") for n in t.getnames())


def _dry_run(*args: str) -> str:
    return subprocess.run(
        ["make", "-n", "-C", str(ROOT), "VENV=/nonexistent/venv", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_make_run_installs_only_what_running_needs() -> None:
    """make run installs the run extras only; make test adds the test and bench tools."""
    run = _dry_run("run")
    installs = [line for line in run.splitlines() if "pip install" in line and "-e" in line]
    assert installs == [
        "/nonexistent/venv/bin/python -m pip install -q -e '.[pkcs11,vault,systemd,redis,uvloop,sodium]'"
    ]
    test = _dry_run("test")
    assert "-e '.[pkcs11,vault,systemd,redis,uvloop,sodium,test,bench]'" in test
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(d.startswith("mkdocs") for d in extras["test"])  # make test builds the docs
    assert any(d.startswith("build") for d in extras["test"])  # and make dist needs build


def test_make_system_installs_what_a_fresh_debian_lacks() -> None:
    """make system checks for python3-venv, a compiler, python3-dev and rsyslog."""
    script = _dry_run("system")
    for package in ("python3-venv", "gcc", "python3-dev", "rsyslog", "libsystemd-dev"):
        assert f'missing="$missing {package}"' in script, package


def test_make_check_builds_the_docs_strictly() -> None:
    """make check (and so make test) runs mkdocs build --strict."""
    assert "mkdocs build --strict" in _dry_run("docs")
    assert "mkdocs build --strict" in _dry_run("check")


@pytest.mark.timeout(120)
def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    """mkdocs build --strict succeeds: no broken link or anchor in docs/."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "configuration.html").exists()


def test_make_install_installs_the_docs(tmp_path: Path) -> None:
    """make install puts README, LICENSE and every docs/ page under the doc directory."""
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"DESTDIR={tmp_path}"],
        check=True,
        capture_output=True,
    )
    doc = tmp_path / "usr" / "share" / "doc" / "signerd"
    assert (doc / "README.md").exists() and (doc / "LICENSE").exists()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages and {p.name for p in (doc / "docs").glob("*.md")} == pages


def test_readme_links_resolve() -> None:
    """Every relative link of the README names a file of the source tree."""
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (ROOT / "README.md").read_text()):
        assert (ROOT / target).exists(), target


def test_units_point_at_the_installed_docs(tmp_path: Path) -> None:
    """Each unit's Documentation= names files that make install puts in place."""
    subprocess.run(
        ["make", "-s", "-C", str(ROOT), "install", f"DESTDIR={tmp_path}"],
        check=True,
        capture_output=True,
    )
    units = sorted((tmp_path / "usr" / "lib" / "systemd" / "system").glob("signerd*"))
    assert units
    for unit in units:
        (line,) = [x for x in unit.read_text().splitlines() if x.startswith("Documentation=")]
        urls = line.removeprefix("Documentation=").split()
        assert any(url.startswith("file:///") for url in urls), unit.name
        for url in urls:  # man: pages are checked in tests/daemon/test_systemd_units.py
            assert url.startswith(("file:///", "man:")), url
            if url.startswith("file:///"):
                assert (tmp_path / url.removeprefix("file:///")).exists(), (unit.name, url)


def test_nothing_tells_to_install_signerd_from_a_package_index() -> None:
    """No doc, configuration or message says `pip install signerd` (it is not published)."""
    pattern = re.compile(r"pip3? install [^\n]*?(?<![\w./-])['\"]?signerd(\[|\b)(?!-)")
    texts = [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("config/*")]
    texts += [*ROOT.glob("systemd/*"), *ROOT.glob("signerd/**/*.py")]
    found = [str(p) for p in texts if p.is_file() and pattern.search(p.read_text())]
    assert not found
    assert pattern.search("pip install 'signerd[systemd]'")  # the pattern finds what it must
    assert not pattern.search('pip install "$(ls dist/signerd-*.whl)[pkcs11]"')
