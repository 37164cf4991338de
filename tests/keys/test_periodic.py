"""The periodic re-read: a backend that can revalidate is listed in full only when it
cannot say its keys are unchanged, or every FULL_EVERY periods; others every period."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from signerd.errors import BackendUnavailable
from signerd.keys._periodic import FULL_EVERY, refresh_periodically

pytestmark = pytest.mark.timeout(30)


class _Revalidating:
    def __init__(self, answers: list[bool | Exception]) -> None:
        self.answers = answers

    def unchanged(self) -> bool:
        answer = self.answers.pop(0) if self.answers else True
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Plain:
    pass


async def test_full_listings_only_when_changed_or_every_few_periods() -> None:
    """25 periods: the revalidating backend is re-read on a change, on a failed check and
    every FULL_EVERY periods; the plain one every period."""
    reval = _Revalidating([True, False, True, BackendUnavailable()])
    rereads: list[str] = []
    periods = 25

    async def run(name: str, fn: Callable[[], bool]) -> bool:
        return fn()

    async def reread(name: str) -> None:
        rereads.append(name)
        if len([r for r in rereads if r == "plain"]) == periods:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await refresh_periodically(
            0.001,
            {"hsm": reval, "plain": _Plain()},  # type: ignore[dict-item]
            run,
            reread,
        )
    # periods 2 (changed) and 4 (check failed), then 4 + FULL_EVERY and 4 + 2 * FULL_EVERY
    assert FULL_EVERY == 10 and rereads.count("hsm") == 4, rereads
    assert rereads.count("plain") == periods
