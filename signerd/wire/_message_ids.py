"""The journal's MESSAGE_ID of each event type signerd logs (stable; docs/api-and-logs.md).

A journald MESSAGE_ID is a 128-bit id in 32 lower-case hex digits
(``journalctl MESSAGE_ID=...`` finds every event of that type).
"""

from __future__ import annotations

__all__ = ["MESSAGE_IDS"]

MESSAGE_IDS: dict[str, str] = {
    "request": "5b1b4e3c2f0a4f0e9d7c6a5b4c3d2e1f",  # one answered request
    "key_created": "265b57cba6364b06b7a408abf9d1a954",
    "key_rotated": "07b0023023c8407c96e8bda22fef603e",
    "key_promoted": "5065754ce4544e12968a6405525039b6",
    "key_retired": "78d7e49193354d6cbce8e50da66e7584",
    "key_destroyed": "02888035c85d4814914abbf06d18045f",
    "key_deletion_scheduled": "10380affb30b4944a8382aaba39e531a",
    "key_refused": "126f070bf7d84a26ba34dc6eaede5901",  # a lifecycle request refused
    "audit_record": "ccfcabeda1644002b5bc4379aac5227e",  # an audit record, copied to the journal
    "audit_anchor": "570b2f086ccc4eaf9055ae296ed331ce",  # an audit anchor, copied to the journal
}
