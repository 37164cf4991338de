"""A real daemon on a SoftHSM token of its own, faulted for real (no injection): the token
directory moved away and back, its object files made unreadable."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signerd.testing import SignerdProcess, make_token, start, wait_until

from ..conftest import ROOT, daemon_config
from ..keys.test_keyring import KeepAlive, _sign

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def own(tmp_path: Path) -> Iterator[tuple[SignerdProcess, Path]]:
    """A daemon (two workers) on a token directory of its own; yields it and that directory."""
    token = make_token(tmp_path / "softhsm", "faults")
    config = daemon_config(tmp_path / "d", server={"workers": 2})
    config["backends"] = {"hsm": token.backend_config()}
    d = start(config, tmp_path / "d", wait=60, cwd=ROOT, env=token.env())
    tokdir = tmp_path / "softhsm" / "tokens"
    assert tokdir.is_dir()
    yield d, tokdir
    d.stop()


def test_token_directory_moved_away_and_back(own: tuple[SignerdProcess, Path]) -> None:
    """While the token's directory is away signing answers 503 (never unknown_*, never 500);
    within 5 s of its return it signs again, with no worker restarted."""
    d, tokdir = own
    call = KeepAlive(d.socket_path)
    try:
        assert call("POST", "/v1/keys", {"key": "acme/moved"}).status == 201
        assert call("POST", "/v1/keys", {"key": "acme/cold"}).status == 201  # never signed yet
        assert _sign(call, "acme/moved").status == 200
        workers = d.worker_pids()
        os.rename(tokdir, tokdir.with_name("tokens.away"))
        try:
            away = [_sign(call, k) for k in ("acme/cold", "acme/moved") * 3]
        finally:
            os.rename(tokdir.with_name("tokens.away"), tokdir)
        back = time.monotonic()
        assert {(r.status, r.code) for r in away} == {(503, "backend_unavailable")}, [
            (r.status, r.body) for r in away
        ]
        wait_until(lambda: _sign(call, "acme/moved").status == 200, 5, "signing again", 0.1)
        assert _sign(call, "acme/cold").status == 200
        recovered_in = time.monotonic() - back
        assert d.worker_pids() == workers, "a worker was restarted"
        assert "signerd.pkcs11.recovered" in d.log_text()
        print(f"signing again {recovered_in:.2f} s after the token returned")
    finally:
        call.close()


def test_unreadable_object_files_answer_503_then_recover(
    own: tuple[SignerdProcess, Path],
) -> None:
    """Object files the daemon cannot read make signing answer 503 (not unknown_version);
    readable again, it signs."""
    d, tokdir = own
    call = KeepAlive(d.socket_path)
    try:
        assert call("POST", "/v1/keys", {"key": "acme/perm"}).status == 201
        assert call("POST", "/v1/keys", {"key": "acme/cold"}).status == 201  # never signed yet
        assert _sign(call, "acme/perm").status == 200
        files = list(tokdir.rglob("*.object"))
        assert files
        # a directory in each file's place: unreadable whoever runs the test (root included)
        for p in files:
            p.rename(p.with_name(p.name + ".aside"))
            p.mkdir()
        try:
            replies = [_sign(call, k) for k in ("acme/cold", "acme/perm") * 2]
        finally:
            for p in files:
                p.rmdir()
                p.with_name(p.name + ".aside").rename(p)
        assert {(r.status, r.code) for r in replies} == {(503, "backend_unavailable")}, [
            (r.status, r.body) for r in replies
        ]
        wait_until(lambda: _sign(call, "acme/perm").status == 200, 5, "signing again", 0.1)
        assert _sign(call, "acme/cold").status == 200
    finally:
        call.close()


_AWAY_AND_BACK = """
import os, sys
from signerd.backends.pkcs11 import from_config
from signerd.errors import SignerdError
from signerd.testing import make_token
from signerd.wire import KeyName
from pathlib import Path

token = make_token(Path(sys.argv[1]), "away")
os.environ["SOFTHSM2_CONF"] = str(token.conf)
tokdir = Path(sys.argv[1]) / "tokens"
backend = from_config(token.backend_config())
key = KeyName("acme", "away")
backend.create(key)
backend.list_keys()
tokdir.rename(tokdir.with_name("tokens.away"))
answers = []
for op in (lambda: backend.sign(key, 1, [b"x"]), lambda: backend.describe(key), backend.check):
    try:
        op()
        answers.append("ok")
    except SignerdError as exc:
        answers.append(exc.code)
tokdir.with_name("tokens.away").rename(tokdir)
print(" ".join(answers))
print(len(backend.sign(key, 1, [b"x"])[0]), backend.describe(key).versions[0].kid)
"""


def test_one_backend_through_its_token_directory_moved_away_and_back(tmp_path: Path) -> None:
    """In one process (a handle never cached): sign, describe and check answer
    backend_unavailable while the token directory is away, and work on its return."""
    done = subprocess.run(
        [sys.executable, "-c", _AWAY_AND_BACK, str(tmp_path / "softhsm")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    away, back = done.stdout.splitlines()
    assert away == "backend_unavailable backend_unavailable backend_unavailable", away
    assert back == "64 acme.away.v1", back
