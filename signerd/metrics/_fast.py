"""Increments of the request path's series, written straight into this process's file.

prometheus-client's multiprocess value takes a lock, looks for a fork and finds its
slot in the file at every increment; a sign request makes about eleven. A worker
increments its series from its loop's thread only, and after its fork, so ``counter``
and ``histogram`` wrap a series child whose values keep their slot: an increment
adds to the value and writes it into the mapping with one ``pack_into``, the
write ``MmapedDict.write_value`` makes. A child whose values are not the
multiprocess kind (series kept in the process, in tests) is returned as it is.
"""

from __future__ import annotations

import bisect
import struct
from typing import Any

__all__ = ["counter", "histogram"]

_PACK = struct.Struct("dd").pack_into  # value, timestamp: the file's slot layout


class _Slot:
    """One multiprocess value (``MmapedValue``) and its place in its file (a counter's
    child, wrapped, is one of these)."""

    __slots__ = ("_file", "_pos", "_value")

    def __init__(self, value: Any) -> None:
        self._value = value
        self._file = value._file
        self._pos = value._file._positions[value._key]

    def inc(self, amount: float = 1.0) -> None:
        value = self._value
        value._value += amount
        _PACK(self._file._m, self._pos, value._value, 0.0)


class _Histogram:
    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, bounds: list[float], buckets: list[_Slot], total: _Slot) -> None:
        self._bounds, self._buckets, self._sum = bounds, buckets, total

    def observe(self, amount: float) -> None:
        # the first bucket whose upper bound is at least ``amount`` (the last is +Inf); the
        # two increments are ``_Slot.inc``'s, written out (a sign observes five histograms)
        bucket, total = self._buckets[bisect.bisect_left(self._bounds, amount)], self._sum
        value = bucket._value
        value._value += 1.0
        _PACK(bucket._file._m, bucket._pos, value._value, 0.0)
        value = total._value
        value._value += amount
        _PACK(total._file._m, total._pos, value._value, 0.0)


def _multiprocess(*values: Any) -> bool:
    return all(getattr(v, "_multiprocess", False) for v in values)


def counter(child: Any) -> Any:
    """``child`` (a counter's) with a cheaper ``inc``, or itself."""
    try:
        if _multiprocess(child._value):
            return _Slot(child._value)
    except (AttributeError, KeyError):
        pass
    return child


def histogram(child: Any) -> Any:
    """``child`` (a histogram's) with a cheaper ``observe``, or itself."""
    try:
        if _multiprocess(child._sum, *child._buckets):
            bounds = list(child._upper_bounds)
            slots = [_Slot(b) for b in child._buckets]
            if len(bounds) == len(slots) and bounds[-1] == float("inf"):
                return _Histogram(bounds, slots, _Slot(child._sum))
    except (AttributeError, KeyError):
        pass
    return child
