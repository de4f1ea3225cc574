"""Clocks the broker reads. Token expiry is wall-clock time (seconds since the epoch)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

import trio

__all__ = ["Clock", "trio_wall_clock", "wall_clock"]

#: A zero-argument callable returning seconds since the epoch. Inject a fake one in tests.
Clock: TypeAlias = Callable[[], float]


def wall_clock() -> float:
    """The system's wall clock, the time base of :attr:`AccessToken.expires_at`."""
    return time.time()


def trio_wall_clock(epoch: float) -> Clock:
    """A wall clock that reads ``epoch`` plus trio's clock (call it inside ``trio.run``).

    Under ``trio.testing.MockClock`` the broker's notion of "now" then moves exactly as
    trio's sleeps and timeouts do, which makes background refresh tests deterministic.
    """

    def now() -> float:
        return epoch + trio.current_time()

    return now
