"""The source's periodic snapshot: the store on disk, and the log it covers dropped."""

from __future__ import annotations

import logging
from typing import Any

from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)


class Snapshotter(Driver):
    """Saves the source's store every ``interval_s``.

    Why a driver of its own: a failed snapshot (a full disk) must not stop the next ones,
    and must not go unseen: it raises to the supervisor (traceback in the log,
    ``ekko_task_failures_total{task="snapshots"}``, ``/ready`` 503 naming it while it waits),
    which restarts it with backoff; a restart after a failure tries again at once instead of
    a whole interval later, so ``/ready`` stays 503 until a snapshot succeeds. The previous
    snapshot and the log keep every acknowledged write meanwhile.
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
        self._retry = False  # the last attempt failed: the next run saves before waiting

    async def run(self) -> None:
        while True:
            if not self._retry:
                await self.clock.sleep(self.interval_s)
            try:
                self.core.save_snapshot()
            except OSError:
                self.failed += 1
                self._retry = True
                raise
            self._retry = False
            self.saved += 1
            log.info("snapshot %d saved", self.saved)

    def status(self) -> dict[str, Any]:
        return {"snapshots": {"saved": self.saved, "failed": self.failed}}
