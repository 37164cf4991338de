"""Large blocks go back to the kernel once freed.

A large request body is held in an anonymous mapping of its own, but what is
decoded from it (the JSON text, the payload, up to ``server.max_body_bytes``
each) comes from ``malloc``. glibc serves a block of 128 KiB or more with
``mmap`` and unmaps it when freed, but raises that threshold to the size of
each such block freed (up to 32 MiB): after the first large body, later ones
come from the heap, where what is freed stays with the process. Fixing the
thresholds keeps large blocks mapped: once 128 held bodies of 1 MiB are
answered, two workers are within 3 MiB of where they started, against 7 to
24 MiB with glibc's moving threshold (``test_body_memory_goes_back_after_release``).
A request's small blocks are untouched.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["return_large_blocks"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 << 10  # glibc's own starting value
TRIM_THRESHOLD = 1 << 20  # free memory at the heap's top kept for reuse


def return_large_blocks() -> bool:
    """Fix glibc's thresholds in this process; False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
