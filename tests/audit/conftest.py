"""Fixtures of the audit tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest


@pytest.fixture
def blocked_fsync(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """os.fsync hangs until the event is set (a disk that stopped answering)."""
    release = threading.Event()
    real = os.fsync

    def fsync(fd: int) -> None:
        release.wait(10)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield release
    release.set()
