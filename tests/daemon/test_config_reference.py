"""docs/configuration.md lists every configuration key the code accepts, with its defaults."""

from __future__ import annotations

import re
from dataclasses import fields

from signerd import _config
from signerd.audit import _settings as audit_settings
from signerd.authz import _parse as policy_parse
from signerd.backends.pkcs11 import _settings as pkcs11_settings
from signerd.backends.vault import _settings as vault_settings
from signerd.federation import _settings as federation_settings
from signerd.forwarding import _settings as forwarding_settings
from signerd.keys import Settings
from signerd.server import Limits

from ..conftest import ROOT

DOC = ROOT / "docs" / "configuration.md"

# each section heading of the reference -> the keys the code accepts there
CODE_KEYS: dict[str, set[str]] = {
    "[server]": set(_config._SERVER),
    "[keys]": set(_config._KEYS),
    '[backends.NAME] type = "pkcs11"': set(pkcs11_settings._KNOWN),
    '[backends.NAME] type = "vault"': set(vault_settings._KNOWN),
    "[tenants.NAME]": {"backend"},  # _config.parse: "only 'backend' may be set"
    "[audit]": set(audit_settings._KNOWN),
    "[policy]": set(policy_parse._POLICY_KEYS),
    "[[policy.rules]]": set(policy_parse._RULE_KEYS),
    "[federation]": set(federation_settings._TOP),
    "[federation.nonces]": set(federation_settings._NONCES),
    "[[federation.trusted_keys]]": set(federation_settings._PEER),
    "[metrics]": set(_config._METRICS),
    "[forwarding]": set(forwarding_settings._KNOWN),
}


def _sections() -> dict[str, dict[str, str]]:
    """Heading -> {key: default cell} from the reference's tables."""
    out: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            current = out.setdefault(line[3:].strip(), {})
            continue
        row = re.fullmatch(r"\| `([a-z_]+)` \|[^|]+\|([^|]*)\|.+\|", line)
        if row and current is not None:
            assert row.group(1) not in current, f"{row.group(1)} listed twice"
            current[row.group(1)] = row.group(2).strip()
    return out


def test_every_configuration_key_is_in_the_reference() -> None:
    """Each section of docs/configuration.md lists exactly the keys the code accepts there."""
    sections = _sections()
    for heading, keys in CODE_KEYS.items():
        assert heading in sections, f"docs/configuration.md has no section '## {heading}'"
        assert set(sections[heading]) == keys, heading
    tables = {h.strip("[]").split(".")[0].split()[0] for h in CODE_KEYS}
    assert tables == set(_config._TOP), "a top-level table of the code has no section here"


def test_reference_defaults_are_the_code_defaults() -> None:
    """The defaults the reference states for [server] and [keys] are those of the code."""
    sections = _sections()
    for heading, defaults in (("[server]", Limits()), ("[keys]", Settings())):
        for f in fields(defaults):
            if f.name in sections[heading]:
                value = getattr(defaults, f.name)
                stated = "none" if value == () else f"`{value!r}`"  # an empty table of rules
                assert sections[heading][f.name] == stated, f.name
    fed = federation_settings.FederationSettings()
    for name in ("skew", "max_json_bytes", "max_depth"):
        assert sections["[federation]"][name] == f"`{getattr(fed, name)!r}`", name
    assert sections["[federation.nonces]"]["max_entries"] == f"`{fed.max_entries!r}`"
    assert sections["[federation.nonces]"]["pool"] == f"`{fed.redis_pool!r}`"
    assert sections["[federation.nonces]"]["url"] == f'`"{fed.redis_url}"`'
    assert sections["[federation.nonces]"]["prefix"] == f'`"{fed.redis_prefix}"`'
