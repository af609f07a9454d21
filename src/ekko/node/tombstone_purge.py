"""The source's tombstone purge, every ``[sync] tombstone_purge_s``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.protocol.floors import TombstonePurger
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)


class TombstonePurge(Driver):
    """Purges, at the source, the tombstones every holder it hears of has (the floors its
    pullers report, ``ekko.protocol.floors``), then wakes parked pulls so each holder hears
    the new purge bars and purges its own.

    Why a driver: a purge that stopped would let tombstones grow without bound under churn
    (every eviction of a dynamic table is one), so it runs under the supervisor like every
    loop, its failures logged and shown in ``/ready``.
    """

    name = "purge_tombstones"

    def __init__(
        self,
        core: NodeCore,
        interval_s: float,
        wake: Callable[[], None],
        clock: LoopClock = SYSTEM_CLOCK,
    ) -> None:
        self.core = core
        self.interval_s = interval_s
        self.wake = wake
        self.clock = clock
        self.purged = 0

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            self.step()

    def step(self) -> int:
        """Purge now; returns the tombstones purged."""
        core = self.core
        epochs = [t.purge_epoch for t in core.store.tables.values()]
        n = TombstonePurger(core.store, core.responder.floors.lowest).tick(self.clock.wall())
        self.purged += n
        if n or epochs != [t.purge_epoch for t in core.store.tables.values()]:
            log.debug("%s purged %d tombstones", core.name, n)
            self.wake()
        return n
