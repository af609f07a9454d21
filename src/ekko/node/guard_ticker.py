"""The guard's clock on a node: the baseline advanced often, the guards judged per interval."""

from __future__ import annotations

from typing import Protocol

from ekko.node.driver import Driver
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

ADVANCE_S = 0.2  # how often the lagged baseline takes the rows that came of age


class Guarded(Protocol):
    """What the ticker drives (``ModelHost``)."""

    def advance_baseline(self, now_mono: float) -> None: ...

    def guard_tick(self, now_mono: float, now_wall: float) -> None: ...


class GuardTicker(Driver):
    """Advances the lagged baseline every ``ADVANCE_S`` and runs every guard's evaluation
    every ``interval_s``, on the injected clock.

    Why apart from the guards: they are sans-IO (``tick(now)``); the loop and its clock are
    the node's, supervised like the other loops.
    """

    name = "guard"

    def __init__(self, models: Guarded, interval_s: float, clock: LoopClock = SYSTEM_CLOCK) -> None:
        if not interval_s > 0:
            raise ValueError(f"GuardTicker.interval_s must be > 0, got {interval_s!r}")
        self.models = models
        self.interval_s = interval_s
        self.clock = clock
        self.ticks = 0

    async def run(self) -> None:
        next_tick = self.clock.mono() + self.interval_s
        while True:
            await self.clock.sleep(ADVANCE_S)
            now = self.clock.mono()
            self.models.advance_baseline(now)
            if now >= next_tick:
                next_tick += self.interval_s
                self.ticks += 1
                self.models.guard_tick(now, self.clock.wall())
