"""What a batch sign's audit record holds (``note_batch``)."""

from __future__ import annotations

from typing import Any

from ..wire import KeyName
from ._context import AuditNotes
from ._context import sha256_hex as _sha256

__all__ = ["note_batch"]

_MAX_ITEM_CODES = 8  # refused batch items whose index and code the audit record lists


def note_batch(
    audit: AuditNotes, parsed: list[tuple[KeyName, bytes]], results: list[dict[str, Any]]
) -> str | None:
    """What a batch's record holds, bounded by what was signed: the keyed hash, key, tenant
    and kid of each signed item (each cost a token of the caller's rate); of the refused
    items only their count, the count of each of the 8 most frequent codes, the first 8
    indexes with their code, and one SHA-256 over their key names (in item order, one per
    line)."""
    signed = [i for i, r in enumerate(results) if "signature" in r]
    audit.hashes = tuple(_sha256(parsed[i][1]) for i in signed)
    audit.tenant = ",".join(sorted({parsed[i][0].tenant for i in signed})) or None
    audit.key = ",".join(sorted({str(parsed[i][0]) for i in signed})) or None
    audit.kid = ",".join(sorted({results[i]["kid"] for i in signed})) or None
    refused = [(i, r["error"]["code"]) for i, r in enumerate(results) if "error" in r]
    if not refused:
        return None
    audit.extra_outcome = f"partial:{len(refused)}/{len(results)}"
    audit.item_codes = tuple(f"{i}:{code}" for i, code in refused[:_MAX_ITEM_CODES])
    counts: dict[str, int] = {}
    for _, code in refused:
        counts[code] = counts.get(code, 0) + 1
    common = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:_MAX_ITEM_CODES]
    others = len(counts) - len(common)
    names = "\n".join(str(parsed[i][0]) for i, _ in refused).encode()
    more = len(refused) - len(audit.item_codes)
    return (
        f"refused {len(refused)} of {len(results)} items ("
        + ",".join(f"{code}={n}" for code, n in sorted(common))
        + (f",+{others} other codes" if others else "")
        + "): "
        + ",".join(audit.item_codes)
        + (f",+{more} more" if more else "")
        + f"; names sha256:{_sha256(names)}"
    )
