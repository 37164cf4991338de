"""Names, kids, versions and other validated strings: whole ASCII matches only.

``$`` in a Python pattern also matches before a final newline, and
``str.isdigit`` accepts superscript, Arabic-Indic and fullwidth digits; every
validator here must refuse both.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from signerd._config import ConfigError, parse
from signerd.authz import policy_from_config, unit_from_cgroup
from signerd.backends.vault import parse_settings
from signerd.errors import InvalidKeyName, UnknownKid, UnknownVersion
from signerd.wire import KeyName, parse_kid, parse_version, request_id_from, valid_part

from ..conftest import DaemonProcess, start_daemon, unique
from ..support.rawhttp import Reply, request

# A trailing newline or carriage return, and digits that are not ASCII
SUFFIXES = ["\n", "\r", "\r\n", "\x00", " "]
NON_ASCII_DIGITS = [
    "\u00b2",
    "\u0663",
    "\uff13",
    "\u0968",
    "\U0001d7d1",
]  # superscript 2; 3 in Arabic-Indic, fullwidth, Devanagari (2), math bold


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_key_names_with_a_trailing_newline_are_refused(suffix: str) -> None:
    """`acme/feedback\\n` (and \\r, NUL, space) is invalid_key_name, in either part."""
    with pytest.raises(InvalidKeyName):
        KeyName.parse("acme/feedback" + suffix)
    with pytest.raises(InvalidKeyName):
        KeyName.parse("acme" + suffix + "/feedback")
    with pytest.raises(InvalidKeyName):
        KeyName.of("acme", "feedback" + suffix)
    assert not valid_part("acme" + suffix)


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_key_names_with_unicode_digits_are_refused(digit: str) -> None:
    """Name parts are ASCII: a non-ASCII digit is invalid_key_name."""
    with pytest.raises(InvalidKeyName):
        KeyName.parse(f"acme/feedback{digit}")
    assert not valid_part(f"t{digit}")


def test_valid_part_refuses_non_strings() -> None:
    """valid_part answers False (never raises) for something that is not a string."""
    assert not valid_part(None)
    assert not valid_part(3)
    assert valid_part("acme")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_kids_with_a_trailing_newline_are_refused(suffix: str) -> None:
    """`acme.feedback.v1\\n` is unknown_kid, not kid v1."""
    assert parse_kid("acme.feedback.v1") == (KeyName("acme", "feedback"), 1)
    with pytest.raises(UnknownKid):
        parse_kid("acme.feedback.v1" + suffix)


@pytest.mark.parametrize("digit", NON_ASCII_DIGITS)
def test_kids_with_unicode_digits_are_refused(digit: str) -> None:
    """A kid's version is ASCII digits: `acme.feedback.v٣` is unknown_kid."""
    with pytest.raises(UnknownKid):
        parse_kid(f"acme.feedback.v{digit}")
    with pytest.raises(UnknownKid):
        parse_kid(f"acme.feedback.v1{digit}")


@pytest.mark.parametrize("text", ["1", "7", "42", "999999999"])
def test_versions_parse_from_ascii_digits(text: str) -> None:
    """A path version of ASCII digits with no leading zero is its number."""
    assert parse_version(text) == int(text)


@pytest.mark.parametrize(
    "text",
    [
        *NON_ASCII_DIGITS,
        *(f"1{d}" for d in NON_ASCII_DIGITS),
        *(f"1{s}" for s in SUFFIXES),
        "",
        "0",
        "01",
        "+1",
        "-1",
        " 1",
        "1_0",
        "1000000000",
        None,
        1,
    ],
)
def test_versions_refuse_everything_else(text: object) -> None:
    """Superscript, Arabic-Indic, fullwidth digits, signs, spaces, newlines: unknown_version."""
    with pytest.raises(UnknownVersion):
        parse_version(text)


@pytest.mark.parametrize("suffix", [*SUFFIXES, "\u0663"])
def test_request_ids_are_matched_whole(suffix: str) -> None:
    """A caller's X-Request-Id with a trailing newline is replaced by a fresh one."""
    assert request_id_from("abc-1", "fresh") == "abc-1"
    assert request_id_from("abc-1" + suffix, "fresh") == "fresh"


def _rule(**fields: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"name": "r", "uids": [0], "tenants": ["acme"], "operations": ["sign"]}
    rule.update(fields)
    return {"rules": [rule]}


@pytest.mark.parametrize("suffix", ["\n", "\r"])
def test_policy_patterns_are_matched_whole(suffix: str) -> None:
    """Policy unit, key-pattern and tenant entries with a trailing newline are refused."""
    policy_from_config(_rule(units=["gw.service"], keys=["tel-*"]))
    with pytest.raises(ValueError, match="units"):
        policy_from_config(_rule(units=["gw.service" + suffix]))
    with pytest.raises(ValueError, match="keys"):
        policy_from_config(_rule(keys=["tel-*" + suffix]))
    with pytest.raises(ValueError, match="tenants"):
        policy_from_config(_rule(tenants=["acme" + suffix]))


def test_cgroup_units_are_matched_whole() -> None:
    """A cgroup component that is not wholly a unit name gives no unit."""
    assert unit_from_cgroup("0::/system.slice/gw.service\n") == "gw.service"
    assert unit_from_cgroup("0::/system.slice/gw\u0663.service\n") is None
    assert unit_from_cgroup("0::/system.slice/gw.service\x00\n") is None


@pytest.mark.parametrize("suffix", ["\n", "\r"])
def test_vault_mounts_and_prefix_are_matched_whole(suffix: str, tmp_path: Path) -> None:
    """Vault mount, namespace and key_prefix with a trailing newline are refused."""
    token = tmp_path / "token"
    token.write_text("t")
    base = {"type": "vault", "addr": "http://127.0.0.1:8200", "token_file": str(token)}
    parse_settings(base)
    for key, value in (
        ("mount", "transit"),
        ("metadata_mount", "secret"),
        ("namespace", "ns"),
        ("key_prefix", "signerd-"),
    ):
        with pytest.raises(ValueError, match=key):
            parse_settings({**base, key: value + suffix})
    with pytest.raises(ValueError, match="tenant_mounts"):
        parse_settings({**base, "tenant_mounts": {"acme": "transit" + suffix}})


def _config(**server: Any) -> dict[str, Any]:
    return {
        "server": {"socket": "/tmp/x.sock", **server},
        "backends": {"hsm": {"type": "pkcs11"}},
        "audit": {"path": "/tmp/a.jsonl"},
    }


@pytest.mark.parametrize(
    "mode", ["0660\n", "660\r", "0o660", "0_660", "\u0660\u0666\u0666\u0660", " 0660", "04660"]
)
def test_socket_mode_is_ascii_octal(mode: str) -> None:
    """server.socket_mode is three octal digits (optionally after 0): nothing int() also takes."""
    assert parse(_config(socket_mode="0640")).socket_mode == 0o640
    assert parse(_config(socket_mode="640")).socket_mode == 0o640
    with pytest.raises(ConfigError, match=r"server\.socket_mode"):
        parse(_config(socket_mode=mode))


@pytest.mark.parametrize("suffix", ["\n", "\r", "\u0663"])
def test_config_names_are_matched_whole(suffix: str) -> None:
    """Bootstrap keys, tenants and backend names with a trailing newline are refused."""
    with pytest.raises(ConfigError, match="bootstrap"):
        parse({**_config(), "keys": {"bootstrap": ["demo/x" + suffix]}})
    with pytest.raises(ConfigError, match="tenants"):
        parse({**_config(), "tenants": {"acme" + suffix: {}}})
    with pytest.raises(ConfigError, match="backends"):
        parse({**_config(), "backends": {"hsm" + suffix: {"type": "pkcs11"}}})


# --- against a real daemon ---


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    d: DaemonProcess = start_daemon(tmp_path_factory.mktemp("names"))
    try:
        yield str(d.socket_path)
    finally:
        assert d.stop() == 0, d.log_text()
        assert "Traceback" not in d.log_text()


def _ok(sock: str, method: str, url: str, body: Any = None, status: int = 200) -> Any:
    reply = request(sock, method, url, body, timeout=20)
    assert reply.status == status, reply.body
    return reply.json


def _refused(reply: Reply, status: int, code: str) -> None:
    assert (reply.status, reply.code) == (status, code), reply.body


@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", ["\n", "\r", "\r\n"])
def test_daemon_refuses_to_create_a_name_with_a_newline(sock: str, suffix: str) -> None:
    """POST /v1/keys with `T/feedback\\n` is 400 invalid_key_name; JWKS and listing still answer."""
    tenant = unique("nl")
    _refused(
        request(sock, "POST", "/v1/keys", {"key": f"{tenant}/feedback{suffix}"}),
        400,
        "invalid_key_name",
    )
    assert _ok(sock, "GET", f"/v1/keys?tenant={tenant}")["keys"] == []
    _ok(sock, "GET", "/v1/jwks")
    _refused(
        request(sock, "POST", "/v1/sign", {"key": f"{tenant}/feedback{suffix}", "data": "aA=="}),
        400,
        "invalid_key_name",
    )


@pytest.fixture
def staged(sock: str) -> tuple[str, str]:
    """A key with v1 active and v2 and v3 pending."""
    tenant = unique("dg")
    key = f"{tenant}/k"
    _ok(sock, "POST", "/v1/keys", {"key": key}, status=201)
    _ok(sock, "POST", f"/v1/keys/{key}/rotate", {"pending": True})
    _ok(sock, "POST", f"/v1/keys/{key}/rotate", {"pending": True})
    return tenant, key


def _states(sock: str, key: str) -> dict[int, str]:
    return {v["version"]: v["state"] for v in _ok(sock, "GET", f"/v1/keys/{key}")["versions"]}


# superscript two; Arabic-Indic, Devanagari and fullwidth two and three; a trailing newline
_PATH_VERSIONS = ["%C2%B2", "%D9%A2", "%D9%A3", "%E0%A5%A8", "%EF%BC%92", "%EF%BC%93", "2%0A"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("action", ["promote", "retire", "destroy"])
def test_daemon_path_versions_are_ascii_digits_only(
    sock: str, staged: tuple[str, str], action: str
) -> None:
    """/versions/{superscript, Arabic-Indic, fullwidth digit, 2\\n}/ACTION is 404 unknown_version, never 500, and touches no version."""
    tenant, key = staged
    before = _states(sock, key)
    assert before == {1: "active", 2: "pending", 3: "pending"}
    body = {"confirm": f"{tenant}.k.v2"} if action == "destroy" else {}
    for version in _PATH_VERSIONS:
        reply = request(sock, "POST", f"/v1/keys/{key}/versions/{version}/{action}", body)
        _refused(reply, 404, "unknown_version")
    assert _states(sock, key) == before
    # the same request with an ASCII digit does act (so the refusal above is about the digit)
    if action != "destroy":
        _ok(sock, "POST", f"/v1/keys/{key}/versions/2/{action}", {})
        assert _states(sock, key) != before


@pytest.mark.timeout(120)
def test_daemon_kids_with_a_newline_or_unicode_digit_are_unknown(
    sock: str, staged: tuple[str, str]
) -> None:
    """/v1/kids/T.k.v1%0A and T.k.v٣ are unknown_kid (404, a lookup), verify with such a kid
    unknown_kid (401); T.k.v1 is found."""
    tenant, key = staged
    kid = f"{tenant}.k.v1"
    assert _ok(sock, "GET", f"/v1/kids/{kid}")["kid"] == kid
    signed = _ok(sock, "POST", "/v1/sign", {"key": key, "data": _b64(b"x")})
    for bad in (f"{kid}%0A", f"{kid}%0D", f"{tenant}.k.v%D9%A3", f"{tenant}.k.v%EF%BC%91"):
        _refused(request(sock, "GET", f"/v1/kids/{bad}"), 404, "unknown_kid")
    for bad in (f"{kid}\n", f"{tenant}.k.v\u0661"):
        reply = request(
            sock,
            "POST",
            "/v1/verify",
            {"kid": bad, "data": _b64(b"x"), "signature": signed["signature"]},
        )
        _refused(reply, UnknownKid.status, "unknown_kid")


@pytest.mark.timeout(60)
def test_daemon_tenant_queries_are_matched_whole(sock: str) -> None:
    """?tenant=acme%0A on listing and JWKS is 400 invalid_key_name."""
    for path in ("/v1/keys", "/v1/jwks"):
        _refused(request(sock, "GET", f"{path}?tenant=acme%0A"), 400, "invalid_key_name")
        _refused(request(sock, "GET", f"{path}?tenant=acme%D9%A3"), 400, "invalid_key_name")


def test_unicode_digits_in_this_module_are_not_ascii() -> None:
    """The probes above are real non-ASCII digits that str.isdigit and int() accept."""
    for digit in NON_ASCII_DIGITS:
        assert digit.isdigit() and not digit.isascii()
    assert int("\u0663") == 3 and int("\uff13") == 3
