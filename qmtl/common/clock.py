"""Injected time: every component that reads the time takes a clock, so tests advance it.

Components take plain callables (``wall: Callable[[], float]`` for ``time.time``-like
seconds since the epoch, ``monotonic: Callable[[], float]`` for intervals); a service
factory takes one :class:`Clock` and hands each component the reading it needs
(``clock.time`` or ``clock.monotonic``). Tests pass a :class:`ManualClock` and call
:meth:`ManualClock.advance` instead of sleeping.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch (wall time: timestamps, expiry)."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (intervals, timeouts, breakers)."""


class SystemClock:
    """The real clocks."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(UTC)


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when told: ``advance(30)`` is 30 s later for both readings."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = float(start)
        self._mono = 1_000.0

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall, UTC)

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._wall += seconds
        self._mono += seconds
