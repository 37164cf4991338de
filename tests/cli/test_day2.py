"""signerctl's day-2 commands against a real daemon on SoftHSM: key details, dry runs,
whoami, trusted keys, and errors that name what was sent."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
import urllib.parse
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from signerd.testing import wait_until
from signerd.wire import b64url, thumbprint

from ..conftest import PIN_FILE, SOFTHSM_MODULE, TOKEN_LABEL, DaemonProcess, start_daemon, unique
from .test_cli import Ctl, kid_of

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def ctl(daemon: DaemonProcess, capsys: pytest.CaptureFixture[str]) -> Ctl:
    return Ctl(daemon, capsys)


@pytest.fixture
def key(ctl: Ctl) -> str:
    name = f"{unique('d2')}/feedback"
    ctl.ok("keys", "create", name)
    return name


def _uri_attrs(uri: str) -> dict[str, str]:
    assert uri.startswith("pkcs11:")
    pairs = [part.split("=", 1) for part in uri[len("pkcs11:") :].split(";")]
    return {k: urllib.parse.unquote(v) for k, v in pairs}


def test_keys_show_has_algorithm_backend_ages_thumbprints_and_pkcs11_uris(
    ctl: Ctl, key: str
) -> None:
    """keys show: Ed25519, the backend's name, created time and age, each version's RFC 7638
    thumbprint (of the key the kid lookup publishes) and its RFC 7512 URI."""
    ctl.ok("keys", "rotate", key, "--pending")
    doc = ctl.json("keys", "show", key)
    assert (doc["algorithm"], doc["backend"]) == ("Ed25519", "hsm")
    for v in doc["versions"]:
        jwk = ctl.json("kid", v["kid"])["jwk"]
        # RFC 7638: the required members, sorted, no whitespace; SHA-256; base64url
        members = json.dumps({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]},
                             sort_keys=True, separators=(",", ":"))  # fmt: skip
        digest = hashlib.sha256(members.encode()).digest()
        assert v["thumbprint"] == base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        attrs = _uri_attrs(v["pkcs11_uri"])
        assert attrs == {
            "token": TOKEN_LABEL,
            "id": v["kid"],
            "object": v["kid"],
            "type": "private",
        }
        assert re.fullmatch(r"id=(%[0-9a-f]{2})+", v["pkcs11_uri"].split(";")[1])
    text = ctl.ok("keys", "show", key)
    assert "algorithm     Ed25519" in text and "backend       hsm" in text
    assert doc["versions"][0]["thumbprint"] in text and "PKCS#11 objects (RFC 7512)" in text
    assert re.search(rf"{re.escape(kid_of(key, 1))}\s+active\s+\S+Z\s+\d+s\s", text)
    listed = ctl.ok("keys", "list", "--tenant", key.split("/")[0])
    assert re.search(
        rf"{re.escape(key)}\s+hsm\s+{re.escape(kid_of(key, 1))}\s+\d+s\s+-\s+2", listed
    )


def test_the_pkcs11_uri_finds_the_private_key_on_the_token(ctl: Ctl, key: str) -> None:
    """The URI keys show prints finds, on the token itself, exactly one private key: the
    version's (its public half is the key the kid lookup publishes)."""
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    version = ctl.json("keys", "show", key)["versions"][0]
    attrs = _uri_attrs(version["pkcs11_uri"])
    lib = pkcs11.lib(SOFTHSM_MODULE)
    token = lib.get_token(token_label=attrs["token"])
    with token.open(user_pin=PIN_FILE.read_text().strip()) as session:
        found = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.PRIVATE_KEY,
                    Attribute.LABEL: attrs["object"],
                    Attribute.ID: attrs["id"].encode(),
                }
            )
        )
        assert len(found) == 1
        public = list(
            session.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.ID: attrs["id"].encode()}
            )
        )
        assert len(public) == 1
        point = public[0][Attribute.EC_POINT]
    raw = point[-32:]
    assert thumbprint(raw) == version["thumbprint"]


def test_dry_runs_show_the_change_and_change_nothing(ctl: Ctl, key: str) -> None:
    """rotate, retire and destroy --dry-run print the state changes they would make; the key
    is the same afterwards; an impossible change is refused as the real one would be."""
    before = ctl.json("keys", "show", key)
    plan = ctl.json("keys", "rotate", key, "--dry-run")
    assert plan["dry_run"] is True
    assert plan["changes"] == [
        {"version": 2, "kid": kid_of(key, 2), "from": None, "to": "active"},
        {"version": 1, "kid": kid_of(key, 1), "from": "active", "to": "verify-only"},
    ]
    pending = ctl.json("keys", "rotate", key, "--pending", "--dry-run")["changes"]
    assert pending == [{"version": 2, "kid": kid_of(key, 2), "from": None, "to": "pending"}]
    assert "dry run: nothing changed" in ctl.ok("keys", "rotate", key, "--dry-run")
    code, _, err = ctl("keys", "retire", key, "1", "--dry-run")
    assert code == os.EX_DATAERR and err.startswith("signerctl: invalid_state: version 1 is active")
    code, _, err = ctl("keys", "destroy", key, "7", "--dry-run")
    assert code == os.EX_NOINPUT and "unknown_version" in err
    assert ctl.json("keys", "show", key) == before
    ctl.ok("keys", "rotate", key)
    assert ctl.json("keys", "retire", key, "1", "--dry-run")["changes"] == [
        {"version": 1, "kid": kid_of(key, 1), "from": "verify-only", "to": "retired"}
    ]
    ctl.ok("keys", "retire", key, "1")
    plan = ctl.json("keys", "destroy", key, "1", "--now", "--dry-run")
    assert plan["changes"] == [
        {"version": 1, "kid": kid_of(key, 1), "from": "retired", "to": "destroyed"}
    ]
    note = f"to destroy it: keys destroy {key} 1 --now --confirm {kid_of(key, 1)}"
    assert plan["notes"] == [note]
    started = time.time()
    (change,) = ctl.json("keys", "destroy", key, "1", "--dry-run")["changes"]
    wait = ctl.json("keys", "show", key)["deletion_wait"]
    assert change["to"] == "pending_deletion" and change["from"] == "retired"
    assert int(started + wait) <= change["deletion_at"] <= time.time() + wait
    assert ctl.json("kid", kid_of(key, 1))["state"] == "retired"


def test_errors_name_the_object_sent(ctl: Ctl, key: str) -> None:
    """A refusal names the key, version or kid signerctl sent; a missing kid exits 66."""
    tenant = key.split("/")[0]
    code, _, err = ctl("keys", "show", f"{tenant}/absent")
    assert code == os.EX_NOINPUT
    assert err.startswith(f"signerctl: unknown_key: key {tenant}/absent: ")
    code, _, err = ctl("keys", "promote", key, "9")
    assert err.startswith(f"signerctl: unknown_version: key {key} version 9: ")
    code, _, err = ctl("kid", f"{tenant}.absent.v1")
    assert code == os.EX_NOINPUT
    assert err.startswith(f"signerctl: unknown_kid: kid {tenant}.absent.v1: ")


def test_whoami_names_the_rules_that_match(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """whoami shows the caller's uid and the rules matching it in policy order, with their
    grants; a rule for another uid is not listed."""
    uid = os.getuid()
    policy = {
        "rules": [
            {"name": "signers", "uids": [uid], "tenants": ["acme"], "keys": ["feed*"],
             "operations": ["sign", "verify"], "rate": 50, "burst": 100},
            {"name": "others", "uids": [uid + 4242], "tenants": ["*"], "operations": ["list"]},
            {"name": "readers", "uids": [uid], "tenants": ["*"], "operations": ["list", "jwks"]},
        ]
    }  # fmt: skip
    d = start_daemon(tmp_path / "d", policy=policy)
    try:
        ctl = Ctl(d, capsys)
        ctl.ok("keys", "list")  # a recorded call: the trail is being written
        wait_until(lambda: len(d.audit_bytes().splitlines()) > 0, timeout=10)
        records = len(d.audit_bytes().splitlines())
        doc = ctl.json("whoami")
        assert doc["peer"]["uid"] == uid and doc["peer"]["pid"] > 0
        assert [r["rule"] for r in doc["rules"]] == ["signers", "readers"]
        signers = doc["rules"][0]
        assert signers["tenants"] == ["acme"] and signers["keys"] == ["feed*"]
        assert signers["operations"] == ["sign", "verify"] and signers["rate"] == 50
        assert doc["rules"][1]["tenants"] is None
        text = ctl.ok("whoami")
        assert f"uid     {uid}" in text
        assert re.search(r"signers\s+acme\s+feed\*\s+sign,verify\s+50/s burst 100", text)
        assert re.search(r"readers\s+\*\s+\*\s+jwks,list\s+-", text)
        assert len(d.audit_bytes().splitlines()) == records  # whoami is not recorded
    finally:
        assert d.stop() == 0, d.log_text()


def test_whoami_of_a_caller_no_rule_matches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caller no rule matches may still ask whoami: no rules, and the text says so."""
    policy = {"rules": [{"name": "x", "uids": [os.getuid() + 4242], "tenants": ["*"],
                         "operations": ["list"]}]}  # fmt: skip
    d = start_daemon(tmp_path / "d", policy=policy)
    try:
        ctl = Ctl(d, capsys)
        assert ctl.json("whoami")["rules"] == []
        assert "no policy rule matches this caller" in ctl.ok("whoami")
    finally:
        assert d.stop() == 0, d.log_text()


def _jwk_file(tmp_path: Path) -> tuple[Path, str]:
    raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    path = tmp_path / "peer.jwk"
    path.write_text(json.dumps({"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}))
    return path, thumbprint(raw)


def test_trust_add_list_remove(ctl: Ctl, tmp_path: Path) -> None:
    """trust add, list (with each key's thumbprint) and remove (finding the tenant) round trip;
    removing a kid no tenant trusts exits 66."""
    tenant = unique("tr")
    peer = f"peer-{unique('p')}"
    jwk_file, print_ = _jwk_file(tmp_path)
    added = ctl.json("trust", "add", "--tenant", tenant, "--kid", peer, "--jwk-file", str(jwk_file))
    assert (added["kid"], added["state"], added["thumbprint"]) == (peer, "active", print_)
    listed = ctl.json("trust", "list", "--tenant", tenant)["keys"]
    assert [(k["kid"], k["state"], k["thumbprint"]) for k in listed] == [(peer, "active", print_)]
    assert print_ in ctl.ok("trust", "list", "--tenant", tenant)
    assert ctl.ok("trust", "list", "--tenant", tenant, "--field", "keys.0.kid").strip() == peer
    removed = ctl.json("trust", "remove", peer)
    assert (removed["tenant"], removed["state"]) == (tenant, "retired")
    code, _, err = ctl("trust", "remove", f"peer-{unique('none')}")
    assert code == os.EX_NOINPUT and err.startswith("signerctl: unknown_kid: kid peer-")


def test_trust_add_refuses_a_file_that_is_not_a_jwk(ctl: Ctl, tmp_path: Path) -> None:
    """A --jwk-file that is not a JSON object of strings exits 65 invalid_jwk, sending nothing."""
    bad = tmp_path / "bad.jwk"
    bad.write_text("[1, 2]")
    code, _, err = ctl("trust", "add", "--tenant", "t", "--kid", "p", "--jwk-file", str(bad))
    assert code == os.EX_DATAERR and err.startswith("signerctl: invalid_jwk: ")
