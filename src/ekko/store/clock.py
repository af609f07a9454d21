"""The time a component reads, injected: wall seconds, monotonic seconds, wall nanoseconds.

Why a protocol of its own: the guard, the node's drivers and the write path all read time;
each takes a ``Clock`` (the system's by default) so a test drives it with a fake one instead
of sleeping, and no module reads ``time.time()`` inline.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    """What a component reads the time from."""

    def wall(self) -> float:
        """Seconds since the epoch (what is stored and shown)."""
        ...

    def mono(self) -> float:
        """Monotonic seconds (intervals and deadlines)."""
        ...

    def ns(self) -> int:
        """Nanoseconds since the epoch (row write times)."""
        ...


class LoopClock(Clock, Protocol):
    """A clock an asyncio driver also waits on."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real time, and ``asyncio.sleep``."""

    def wall(self) -> float:
        return time.time()

    def mono(self) -> float:
        return time.monotonic()

    def ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A clock a test moves (``advance``). ``sleep`` jumps the time forward by what it
    sleeps and yields to the loop once (trio's autojump clock), so a driver's timed loop runs
    at full speed and deterministically. Wall and monotonic time move together."""

    def __init__(self, wall: float = 1_000_000.0, mono: float = 100.0) -> None:
        self._wall = wall
        self._mono = mono
        self.slept: list[float] = []

    def wall(self) -> float:
        return self._wall

    def mono(self) -> float:
        return self._mono

    def ns(self) -> int:
        return int(self._wall * 1e9)

    def advance(self, seconds: float) -> None:
        self._wall += seconds
        self._mono += seconds

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
