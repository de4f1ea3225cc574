"""Clocks the broker reads. Token expiry is wall-clock time (seconds since the epoch)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeAlias

__all__ = ["Clock", "wall_clock"]

#: A zero-argument callable returning seconds since the epoch. Inject a fake one in tests.
Clock: TypeAlias = Callable[[], float]


def wall_clock() -> float:
    """The system's wall clock, the time base of :attr:`AccessToken.expires_at`."""
    return time.time()
