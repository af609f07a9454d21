"""A node started by a launcher stops when the launcher is gone.

``LocalCluster`` (``ekko up``, the tests and benches) starts each node in its own session, so
a Ctrl-C meant for the launcher does not reach the nodes half-way through its own shutdown.
The price: a launcher killed outright (kill -9, a test run's timeout) left its nodes running,
holding their ports, with nobody to stop them — found as a source still up 15 minutes after
its test run died. The launcher names itself in ``EKKO_PARENT_PID``; a node whose parent is no
longer that process (it was re-parented: the launcher exited) stops as on SIGTERM.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

from ekko.node.driver import Driver
from ekko.store.clock import LoopClock

log = logging.getLogger(__name__)

ENV = "EKKO_PARENT_PID"


def parent_pid(env: Mapping[str, str]) -> int | None:
    """The launcher's pid from ``EKKO_PARENT_PID`` (None: unset); a value that is no pid
    above 1 raises ValueError naming it."""
    raw = env.get(ENV)
    if raw is None or raw == "":
        return None
    try:
        pid = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected the launcher's process id") from None
    if pid <= 1:
        raise ValueError(f"{ENV}={raw!r}: expected the launcher's process id (> 1)")
    return pid


class ParentWatch(Driver):
    """Stops the node (``stop``) once its parent process is not ``parent`` any more.

    Why poll ``getppid``: the node must learn of a launcher killed by SIGKILL, which sends it
    nothing; a re-parented process sees another parent at once, and a check a second costs
    nothing."""

    name = "parent_watch"

    def __init__(
        self,
        parent: int,
        stop: Callable[[], None],
        clock: LoopClock,
        interval_s: float = 1.0,
        getppid: Callable[[], int] = os.getppid,
    ) -> None:
        self.parent = parent
        self.stop_node = stop
        self.clock = clock
        self.interval_s = interval_s
        self.getppid = getppid
        self.stopped = False

    async def run(self) -> None:
        while True:
            now = self.getppid()
            if now != self.parent:
                log.warning(
                    "the process that started this node (pid %d) is gone (parent now %d): "
                    "stopping", self.parent, now,
                )  # fmt: skip
                self.stopped = True
                self.stop_node()
                return
            await self.clock.sleep(self.interval_s)
