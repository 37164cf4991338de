"""Which 32-byte strings signerd accepts as Ed25519 public keys (RFC 8032 section 5.1.3).

An encoding is refused when it is not canonical (``y >= p``, or the sign bit
set for a point whose ``x`` is 0: the identity and the point of order 2), not
a point of the curve, or a point of small order (``[8]P`` is the identity).
A small-order key verifies forged signatures: with the identity as the key,
the signature ``01 00..00 || 00..00`` is valid for every message. The eight
small-order points are refused in every spelling because the check multiplies
the decoded point by 8 rather than comparing against a list.

``check_public`` is the one check every way a public key enters signerd goes
through (``_jwk.from_jwk``, the trusted peer keys from the API, the
configuration and ``trusted-keys.json``). Pure Python, about 0.2 ms a key.
"""

from __future__ import annotations

import functools

__all__ = ["check_public", "weakness"]

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)

_Point = tuple[int, int, int, int]  # extended coordinates X, Y, Z, T with x = X/Z, y = Y/Z


def _decode(raw: bytes) -> tuple[int, int] | str:
    """The affine point of a canonical encoding, or why the encoding is refused."""
    if len(raw) != 32:
        return "not 32 bytes"
    value = int.from_bytes(raw, "little")
    sign, y = value >> 255, value & ((1 << 255) - 1)
    if y >= _P:
        return "non-canonical encoding (y >= p)"
    u, v = (y * y - 1) % _P, (_D * y * y + 1) % _P
    # x = sqrt(u / v) = u v^3 (u v^7)^((p-5)/8), then fix up by sqrt(-1) (RFC 8032 5.1.3)
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx == (-u) % _P:
        x = x * _SQRT_M1 % _P
    elif vxx != u:
        return "not a point on the curve"
    if x == 0 and sign == 1:
        return "non-canonical encoding (sign bit set with x = 0)"
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(point: _Point) -> _Point:
    x1, y1, z1, _ = point
    a, b, c = x1 * x1 % _P, y1 * y1 % _P, 2 * z1 * z1 % _P
    h = (a + b) % _P
    e = (h - (x1 + y1) * (x1 + y1)) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


@functools.lru_cache(maxsize=4096)  # a JWKS refresh checks the same keys again
def weakness(raw: bytes) -> str | None:
    """Why ``raw`` is not an acceptable Ed25519 public key, or None when it is."""
    decoded = _decode(raw)
    if isinstance(decoded, str):
        return decoded
    x, y = decoded
    point: _Point = (x, y, 1, x * y % _P)
    for _ in range(3):
        point = _double(point)
    px, py, pz, _ = point
    if px == 0 and py == pz:  # [8]P is the identity
        return "a point of small order"
    return None


def check_public(raw: bytes) -> bytes:
    """``raw`` when it is an acceptable Ed25519 public key; ValueError saying why not otherwise."""
    reason = weakness(raw)
    if reason is not None:
        raise ValueError(f"not an acceptable Ed25519 public key: {reason}")
    return raw
