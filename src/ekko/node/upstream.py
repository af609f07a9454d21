"""A replica's upstream: the first reachable candidate, failover down the list, the pull link.

``Upstream`` pulls from the most preferred candidate that answers, moves down the list when
it cannot connect, and returns to a preferred one as soon as it accepts a connection again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ekko.net.errors import TransportError
from ekko.net.transport import Connection
from ekko.node.apply_port import ApplyFanout
from ekko.node.config import ClusterConfig, NodeConfig
from ekko.node.core import NodeCore
from ekko.node.driver import Driver
from ekko.node.sync_host import run_pull_link
from ekko.node.sync_port import SyncPort
from ekko.protocol.messages import PullResponse
from ekko.protocol.puller import Puller
from ekko.store.clock import SYSTEM_CLOCK, LoopClock

log = logging.getLogger(__name__)


def upstream_groups(config: ClusterConfig, name: str) -> list[tuple[int, ...]]:
    """The partitions node ``name`` pulls, grouped by their candidate upstreams (one link
    each): in order of the first partition of each group."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for p in config.held(name):
        groups.setdefault(tuple(n.name for n in config.upstreams(name, p)), []).append(p)
    return [tuple(g) for g in groups.values()]


class Upstream(Driver):
    """Keeps a replica pulling from its best reachable upstream.

    Why a driver of its own: selection, failover and the return to a preferred upstream are
    one policy over one link at a time; the rows the link applies leave through ``apply``
    (the apply port), and a whole-store rebuild from another lineage is reported to
    ``on_rebuilt`` so the node serves the new tables.

    Args:
        core: the node (store, config, traffic owed upstream, link statistics).
        port: connects to the candidates.
        apply: the apply port: told when a link comes up, given each ``Applied`` report of
            the link's puller.
        on_rebuilt: the store's tables were replaced by another lineage's.
        connected: set once the first upstream accepted a connection (the node is ready).
        clock: the waits between connection rounds and probes.
        partitions: in a partitioned cluster, the held partitions this link pulls (they
            share their candidates, ``upstream_groups``); None: every shard, as before.
    """

    name = "upstream"

    def __init__(
        self,
        core: NodeCore,
        port: SyncPort,
        apply: ApplyFanout,
        on_rebuilt: Callable[[], None],
        connected: asyncio.Event | None = None,
        clock: LoopClock = SYSTEM_CLOCK,
        partitions: tuple[int, ...] | None = None,
    ) -> None:
        self.core = core
        self.partitions = partitions
        if partitions is not None:
            self.name = "upstream-p" + "-".join(map(str, partitions))
        self.port = port
        self.apply = apply
        self.on_rebuilt = on_rebuilt
        self.connected = connected if connected is not None else asyncio.Event()
        self.clock = clock
        first = partitions[0] if partitions else None
        self.candidates = core.config.upstreams(core.name, first)
        self._lineage = self._history_lineage()

    async def run(self) -> None:
        probe_s = self.core.config.sync.failover_probe_s
        while True:
            for i, peer in enumerate(self.candidates):
                conn = await self.port.dial(peer)
                if conn is None:
                    continue
                self.connected.set()
                try:
                    await self._pull(conn, peer, self.candidates[:i])
                finally:  # a bug raises on to the supervisor (logged, counted, restarted)
                    with contextlib.suppress(TransportError, OSError):
                        await conn.close()
                break
            else:
                scope = "" if self.partitions is None else f" (partitions {list(self.partitions)})"
                log.warning("no upstream of %s%s reachable; retrying", self.core.name, scope)
                await self.clock.sleep(probe_s / 4)

    async def _pull(self, conn: Connection, peer: NodeConfig, preferred: list[NodeConfig]) -> None:
        """Pull from ``peer`` until the link breaks or a preferred upstream is back."""
        core = self.core
        core.upstream_name = peer.name
        for p in self.partitions or ():
            core.upstream_of[p] = peer.name
        scope = "" if self.partitions is None else f" partitions {list(self.partitions)}"
        log.info("%s pulling%s from %s (link up)", core.name, scope, peer.name)
        self.apply.link_up(peer.name, self.clock.wall())
        puller = Puller(
            core.store,
            core.puller_config(self.port.wan(peer.name), self.partitions),
            latency=None,  # measured by the apply port
            traffic=core.traffic,
            floors=lambda now: core.responder.floors.all_lowest(core.store, now),
        )
        core.links.attach(peer.name, puller)
        rebuilds = puller.rebuilds

        def on_response(msg: PullResponse) -> None:
            nonlocal rebuilds
            if puller.rebuilds != rebuilds:
                rebuilds = puller.rebuilds
                self._rebuilt()
            self._lineage = self._history_lineage()  # adopted by an empty store, or rebuilt

        probe = self._probe(preferred) if preferred else None
        try:
            if await run_pull_link(conn, puller, on_response, probe, self.apply, self.clock):
                log.info("%s returns to preferred upstream", core.name)
        finally:
            if core.upstream_name == peer.name:
                core.upstream_name = None
            for p in self.partitions or ():
                core.upstream_of[p] = None
            core.links.detach(peer.name, puller)

    def _history_lineage(self) -> int:
        """The lineage of this link's partitions (a store of several sources keeps one per
        source: ``ekko.store.sources``)."""
        store = self.core.store
        return store.history(self.partitions if store.multi_source else None).lineage

    def _rebuilt(self) -> None:
        self.core.rebuilds += 1
        scope = "" if self.partitions is None else f" partitions {list(self.partitions)}"
        log.warning(
            "%s rebuilt its store%s from lineage %x (was %x): rows the source lacks are gone",
            self.core.name,
            scope,
            self._history_lineage(),
            self._lineage,
        )
        self.on_rebuilt()

    async def _probe(self, preferred: list[NodeConfig]) -> None:
        """Return once a preferred upstream accepts a connection again."""
        while True:
            await self.clock.sleep(self.core.config.sync.failover_probe_s)
            for peer in preferred:
                conn = await self.port.dial(peer)
                if conn is not None:
                    with contextlib.suppress(TransportError, OSError):
                        await conn.close()
                    return
