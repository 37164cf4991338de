"""The unit files: hardening score and `systemd-analyze verify`, on the installed units.

The units are installed with ``make install DESTDIR=tmp BINDIR=<this venv's bin>``
so that verify also checks that every ExecStart= names a real executable.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("signerd.service", "signerd-rotate@.service", "signerd-rotate-staged@.service")
UNITS = (
    "signerd.socket",
    "signerd.service",
    "signerd-rotate@.service",
    "signerd-rotate@.timer",
    "signerd-rotate-staged@.service",
    "signerd-rotate-staged@.timer",
)
MAX_EXPOSURE = 1.5

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The units as `make install` writes them, with ExecStart= pointing at this venv."""
    dest = tmp_path_factory.mktemp("destdir")
    bindir = Path(sys.executable).parent
    subprocess.run(
        ["make", "-s", "-C", str(REPO), "install", f"DESTDIR={dest}", f"BINDIR={bindir}"],
        check=True,
        timeout=60,
    )
    return dest / "usr/lib/systemd/system"


def _exposure(path: Path) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9]+\.[0-9]+)", done.stdout)
    assert m is not None, done.stdout + done.stderr
    return float(m[1])


@pytest.mark.parametrize("unit", SERVICES)
def test_repository_unit_exposure_at_most_1_5(unit: str) -> None:
    """systemd-analyze security --offline=true rates each service in systemd/ at 1.5 or lower."""
    assert _exposure(REPO / "systemd" / unit) <= MAX_EXPOSURE


@pytest.mark.parametrize("unit", SERVICES)
def test_installed_unit_exposure_at_most_1_5(installed: Path, unit: str) -> None:
    """The installed services keep the score (install only rewrites ExecStart= paths)."""
    assert _exposure(installed / unit) <= MAX_EXPOSURE


def test_exposure_check_can_fail(tmp_path: Path) -> None:
    """The score parser sees a bare service as exposed (so the checks above can fail)."""
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert _exposure(bare) > 9.0


def test_units_verify_without_warnings(installed: Path) -> None:
    """systemd-analyze verify prints nothing for any unit (templates checked as instances)."""
    for unit in UNITS:
        assert (installed / unit).exists(), unit
    targets = [str(installed / u) for u in UNITS]
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *targets],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0 and done.stdout + done.stderr == "", done.stdout + done.stderr


def test_documentation_points_at_installed_man_pages(installed: Path) -> None:
    """Each service's Documentation= names man pages, and make install put each one where
    man finds it under PREFIX (with signerctl's bash, zsh and fish completions)."""
    usr = installed.parents[2]
    for unit in (*SERVICES, "signerd.socket"):
        text = (installed / unit).read_text()
        pages = [
            d for line in text.splitlines() if line.startswith("Documentation=")
            for d in line.split("=", 1)[1].split() if d.startswith("man:")
        ]  # fmt: skip
        assert pages, unit
        for page in pages:
            m = re.fullmatch(r"man:([a-z]+)\(([18])\)", page)
            assert m is not None, page
            assert (usr / "share/man" / f"man{m[2]}" / f"{m[1]}.{m[2]}").is_file(), page
    assert "man:signerd(8)" in (installed / "signerd.service").read_text()
    for completion in (
        "share/bash-completion/completions/signerctl",
        "share/zsh/vendor-completions/_signerctl",
        "share/fish/vendor_completions.d/signerctl.fish",
    ):
        assert (usr / completion).is_file(), completion


def test_verify_check_can_fail(tmp_path: Path) -> None:
    """verify complains about a unit with a typo (so the check above can fail)."""
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nRestartPreventExitStatuss=78\n")
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "RestartPreventExitStatuss" in done.stderr


def test_packaged_settings() -> None:
    """The service is Type=notify with watchdog, reload by SIGHUP, no retry on 78, PIN by credential."""
    text = (REPO / "systemd" / "signerd.service").read_text()
    settings = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    assert settings["RestartPreventExitStatus"] == "78" and settings["Restart"] == "on-failure"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["LoadCredential"] == "pin:/etc/signerd/credentials/pin"
    assert int(settings["WatchdogSec"]) > 0
    socket_text = (REPO / "systemd" / "signerd.socket").read_text()
    assert "ListenStream=/run/signerd/signerd.sock" in socket_text
    assert "SocketMode=0660" in socket_text


def test_staged_unit_promotes_then_publishes() -> None:
    """The staged unit promotes the pending version (none is fine) before publishing the next."""
    text = (REPO / "systemd" / "signerd-rotate-staged@.service").read_text()
    starts = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart=")]
    assert [s.split(" keys ", 1)[1] for s in starts] == [
        "promote %I --pending --if-any",
        "rotate %I --pending",
    ]
    assert "User=signerd-rotate\n" in text
