"""Process-shared, robust pthread mutexes in anonymous shared mappings (through ctypes).

A worker that dies holding one leaves it to the next taker, who gets
EOWNERDEAD, marks it consistent and goes on: a killed worker cannot wedge the
others. Used by the shared rate buckets and the shared connection counts.
"""

from __future__ import annotations

import ctypes
import errno
import os

__all__ = ["MUTEX_BYTES", "acquire", "init_mutexes", "release"]

MUTEX_BYTES = 64  # bytes per mutex (pthread_mutex_t is 40 on x86-64, 48 on arm64)
_PTHREAD_PROCESS_SHARED = 1
_PTHREAD_MUTEX_ROBUST = 1

_libc = ctypes.CDLL(None, use_errno=True)
_lock = _libc.pthread_mutex_lock
release = _libc.pthread_mutex_unlock
_consistent = _libc.pthread_mutex_consistent
for _f in (_lock, release, _consistent):
    _f.argtypes = [ctypes.c_void_p]
    _f.restype = ctypes.c_int


def init_mutexes(base: int, count: int) -> None:
    """``count`` process-shared robust mutexes, ``MUTEX_BYTES`` apart from ``base``."""
    attr = ctypes.create_string_buffer(64)
    for call, args in (
        (_libc.pthread_mutexattr_init, ()),
        (_libc.pthread_mutexattr_setpshared, (_PTHREAD_PROCESS_SHARED,)),
        (_libc.pthread_mutexattr_setrobust, (_PTHREAD_MUTEX_ROBUST,)),
    ):
        _check(call(attr, *args))
    for g in range(count):
        _check(_libc.pthread_mutex_init(ctypes.c_void_p(base + g * MUTEX_BYTES), attr))
    _libc.pthread_mutexattr_destroy(attr)


def acquire(mutex: int) -> int:
    """Lock a robust mutex; one whose holder died is taken over (its data may be one update behind)."""
    got = _lock(mutex)
    if got == errno.EOWNERDEAD:
        _check(_consistent(mutex))
    elif got != 0:
        raise OSError(got, os.strerror(got))
    return mutex


def _check(result: int) -> None:
    if result != 0:
        raise OSError(result, os.strerror(result))
