"""The scheduler's release timer: deferred rows written once their staleness bound is due."""

from __future__ import annotations

from typing import Protocol

from ekko.node.driver import Driver
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

TICK_S = 0.05  # the longest wait between two looks at the held rows


class Releasing(Protocol):
    """The write port's deferral side (``release`` writes the rows due, waking parked pulls
    itself, and returns how many)."""

    def next_due(self) -> float | None: ...

    def release(self, now: float, now_ns: int) -> int: ...


class ReleaseTimer(Driver):
    """Calls the write port's ``release`` when its earliest held row is due (at least every
    ``TICK_S``).

    Why a driver: held rows live only in the scheduler until released; a timer that died
    would hold them until shutdown, so it runs under the supervisor like every loop.
    """

    name = "release_held"

    def __init__(self, port: Releasing, clock: LoopClock = SYSTEM_CLOCK) -> None:
        self.port = port
        self.clock = clock

    async def run(self) -> None:
        while True:
            due = self.port.next_due()
            wait = TICK_S if due is None else min(TICK_S, max(0.0, due - self.clock.wall()))
            await self.clock.sleep(wait)
            self.step()

    def step(self) -> int:
        """Release what is due now; returns the rows written."""
        return self.port.release(self.clock.wall(), self.clock.ns())
