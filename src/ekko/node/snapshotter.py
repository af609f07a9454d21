"""The source's periodic snapshot: the store on disk, and the log it covers dropped."""

from __future__ import annotations

import logging

from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)


class Snapshotter(Driver):
    """Saves the source's store every ``interval_s``.

    Why a driver of its own: a failed snapshot (a full disk) must not stop the next ones;
    the previous snapshot and the log keep every acknowledged write meanwhile.
    """

    name = "snapshots"

    def __init__(self, core: NodeCore, interval_s: float, clock: LoopClock = SYSTEM_CLOCK):
        if not interval_s > 0:
            raise ValueError(f"Snapshotter.interval_s must be > 0, got {interval_s!r}")
        self.core = core
        self.interval_s = interval_s
        self.clock = clock
        self.saved = 0
        self.failed = 0

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            try:
                self.core.save_snapshot()
                self.saved += 1
            except OSError as exc:
                self.failed += 1
                log.error("snapshot failed (%s); the previous snapshot is kept", exc)
