"""The PKCS#11 backend under injected token faults (a double around the real SoftHSM objects):
what each fault answers, and the recovery ladder it climbs."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pkcs11 import exceptions as p11e

from signerd.backends import CredentialsRefused, VersionState
from signerd.backends.pkcs11 import Pkcs11Backend
from signerd.backends.pkcs11._ladder import EXIT_TOKEN_WEDGED, Ladder
from signerd.backends.pkcs11._settings import parse_settings
from signerd.errors import BackendUnavailable, UnknownVersion
from signerd.wire import KeyName

from ..conftest import pkcs11_backend_config, unique
from ..support.pkcs11_faults import Faults, faulty_lib

FAULTS = [
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.ObjectHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.DeviceError,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.GeneralError,
    p11e.DeviceMemory,
    p11e.FunctionFailed,
]


class Rig:
    def __init__(self, pin_file: str | None = None) -> None:
        self.faults = Faults()
        self.sleeps: list[float] = []
        self.exits: list[int] = []
        self.ladder = Ladder(sleep=self.sleeps.append, exit=self.exits.append)
        cfg = pkcs11_backend_config()
        if pin_file is not None:
            cfg["pin_file"] = pin_file
        self.backend = Pkcs11Backend(
            parse_settings({k: v for k, v in cfg.items() if k != "type"} | {"type": "pkcs11"}),
            open_lib=faulty_lib(self.faults),
            ladder=self.ladder,
        )
        self.key = KeyName(unique("flt"), "k")


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    r.backend.create(r.key)
    r.backend.list_keys()
    yield r
    r.faults.raises.clear()
    r.faults.listing = "real"
    r.backend.close()


def _steps(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage().split("step=")[1].split()[0]
        for r in caplog.records
        if r.getMessage().startswith("signerd.pkcs11.recover ")
    ]


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
def test_a_single_fault_is_recovered_and_the_signature_made(
    rig: Rig, fault: type[Exception]
) -> None:
    """One token fault during a signature climbs one rung and the signature is still made."""
    rig.faults.fail("sign", fault)
    [sig] = rig.backend.sign(rig.key, 1, [b"data"])
    assert isinstance(sig, bytes) and len(sig) == 64
    assert rig.exits == []


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("op", ["sign", "get_objects"])
def test_a_lasting_fault_is_backend_unavailable_after_each_rung_logged_once(
    rig: Rig, fault: type[Exception], op: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault that outlasts the ladder answers 503 backend_unavailable, each rung logged once."""
    rig.faults.fail(op, fault, times=50)
    caplog.set_level(logging.INFO, "signerd.pkcs11")
    for _ in range(2):
        with pytest.raises(BackendUnavailable) as err:
            if op == "sign":
                rig.backend.sign(rig.key, 1, [b"data"])
            else:
                rig.backend.describe(rig.key)
        assert err.value.status == 503 and err.value.code == "backend_unavailable"
        assert type(err.value) is BackendUnavailable
    steps = _steps(caplog)
    handle = fault is p11e.ObjectHandleInvalid
    expected = (
        ["refind_handles", "reinitialize"]
        if handle
        else ["reopen_session", "refind_handles", "reinitialize"]
    )
    assert steps == expected, steps
    rig.faults.raises.clear()
    assert len(rig.backend.sign(rig.key, 1, [b"x"])[0]) == 64  # type: ignore[arg-type]
    assert any("signerd.pkcs11.recovered" in r.getMessage() for r in caplog.records)


def test_a_stale_handle_is_found_again_without_reinitialising(rig: Rig) -> None:
    """An object-handle error forgets the cached handle and finds it again; no re-initialise."""
    rig.backend.sign(rig.key, 1, [b"warm"])
    lookups = rig.faults.calls.get("get_key", 0)
    rig.faults.fail("sign", p11e.ObjectHandleInvalid)
    rig.backend.sign(rig.key, 1, [b"data"])
    assert rig.faults.calls["get_key"] == lookups + 1
    assert rig.faults.reinitialized == 0


def test_backoff_doubles_with_jitter_between_rungs(rig: Rig) -> None:
    """No pause before the first rung; the pauses after it are jittered and grow."""
    rig.faults.fail("sign", p11e.DeviceError, times=50)
    with pytest.raises(BackendUnavailable):
        rig.backend.sign(rig.key, 1, [b"data"])
    assert len(rig.sleeps) == 2, rig.sleeps
    assert 0.01 <= rig.sleeps[0] <= 0.02 and 0.02 <= rig.sleeps[1] <= 0.04, rig.sleeps


def test_user_already_logged_in_is_tolerated(rig: Rig) -> None:
    """Reopening a session whose login is still current (UserAlreadyLoggedIn) is no failure."""
    rig.faults.fail("sign", p11e.SessionClosed)
    rig.faults.fail("open", p11e.UserAlreadyLoggedIn)
    assert len(rig.backend.sign(rig.key, 1, [b"data"])[0]) == 64  # type: ignore[arg-type]


def test_an_empty_listing_is_never_unknown_for_a_key_that_exists(rig: Rig) -> None:
    """Searches that return nothing without an error answer 503, not unknown_version/key."""
    rig.faults.listing = "empty"
    with pytest.raises(BackendUnavailable) as signed:
        rig.backend.sign(rig.key, 1, [b"data"])
    with pytest.raises(BackendUnavailable) as described:
        rig.backend.describe(rig.key)
    with pytest.raises(BackendUnavailable):
        rig.backend.create(KeyName(rig.key.tenant, "other"))
    assert type(signed.value) is BackendUnavailable, signed.value
    assert type(described.value) is BackendUnavailable, described.value


def test_an_empty_listing_that_passes_is_climbed_out_of(rig: Rig) -> None:
    """One empty search (a token that came back) is recovered by a new session: signing works."""
    rig.faults.listing, rig.faults.listing_calls = "empty", 1
    assert len(rig.backend.sign(rig.key, 1, [b"data"])[0]) == 64  # type: ignore[arg-type]


def test_a_partial_listing_is_not_an_error_and_loses_no_key(rig: Rig) -> None:
    """A search cut short lists fewer keys without an error; each key still describes and signs."""
    other = KeyName(rig.key.tenant, "second")
    rig.backend.create(other)
    rig.faults.listing = "partial"
    listed = {i.key for i in rig.backend.list_keys()}
    assert len(listed) <= 1
    for key in (rig.key, other):
        assert rig.backend.describe(key).versions[0].state is VersionState.ACTIVE
        assert len(rig.backend.sign(key, 1, [b"d"])[0]) == 64  # type: ignore[arg-type]


def test_a_destroyed_version_is_still_unknown_version(rig: Rig) -> None:
    """A version the key's metadata says is destroyed answers unknown_version, not 503."""
    rig.backend.rotate(rig.key, pending=False)
    rig.backend.set_state(rig.key, 1, VersionState.RETIRED)
    rig.backend.destroy(rig.key, 1)
    with pytest.raises(UnknownVersion):
        rig.backend.sign(rig.key, 1, [b"data"])


def test_a_library_that_keeps_failing_after_reinitialising_exits_for_a_new_worker(
    rig: Rig,
) -> None:
    """Three full climbs in a row with the token reachable and still failing end the process (75)."""
    rig.faults.fail("sign", p11e.GeneralError, times=100)
    for _ in range(3):
        with pytest.raises(BackendUnavailable):
            rig.backend.sign(rig.key, 1, [b"data"])
    assert rig.exits == [EXIT_TOKEN_WEDGED]


@pytest.mark.parametrize("where", ["open", "sign"])
def test_an_absent_token_never_ends_the_process(rig: Rig, where: str) -> None:
    """A token that cannot be opened, or says it is absent, is answered 503 for as long as it
    lasts, with no exit."""
    rig.faults.fail("sign", p11e.TokenNotPresent)
    rig.faults.fail(where, p11e.TokenNotPresent, times=100)
    for _ in range(5):
        with pytest.raises(BackendUnavailable):
            rig.backend.sign(rig.key, 1, [b"data"])
    assert rig.exits == []


def test_a_wrong_pin_is_one_login_attempt(tmp_path: Path) -> None:
    """A refused PIN is tried once, however often it is asked: no retries to lock the token."""
    pin = tmp_path / "pin"
    pin.write_text("Wr0ng-pin-zq\n")
    r = Rig(str(pin))
    try:
        with pytest.raises(CredentialsRefused):
            r.backend.list_keys()
        assert r.faults.logins == 1 and r.ladder.exiting is False
    finally:
        r.backend.close()
