"""The guard at a non-source node of a partitioned cluster: its lagged baseline, a
``HolderGuard`` per model (it holds partitions) and, on a serving node, a
``ScatterReplicaGuard`` per model whose baseline variant reads the holders' lagged stores.

Apart from ``ModelHost`` so the partitioned guard's wiring is one module; the host calls
``GuardHolders.build`` once and hands over the applied rows (``poll``), routes, metrics and
the close. Partition sources (the coordinator among them) are ``ekko.node.guard_sources``'.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ekko.guard.baseline import LaggedStore
from ekko.guard.holder_guard import HolderGuard
from ekko.guard.log import TransitionLog
from ekko.node.access import ClusterAuth
from ekko.node.core import NodeCore
from ekko.node.http_client import ClusterHttp
from ekko.node.scatter_rows import scatter_rows

if TYPE_CHECKING:
    from ekko.node.models import ModelHost
    from ekko.serve.scatter import PartitionedLookup

log = logging.getLogger(__name__)


def baseline_rows(
    core: NodeCore, http: ClusterHttp, secret: bytes, lagged: LaggedStore
) -> PartitionedLookup:
    """The baseline's scatter: each partition from this node's own lagged store when it
    holds it, then from the partition's other holders in the node's DC over baseline lookup
    streams. Sources are left out: they keep no lagged store (every one would answer 409)."""
    cfg = core.config
    sources = {cfg.source_of(p).name for p in range(cfg.cluster.partitions)}
    return scatter_rows(core, http, secret, local=lagged.store, variant="baseline", skip=sources)


class GuardHolders:
    """The partitioned guard's parts at one non-source node.

    Why one object: the host has one thing to poll after each applied response, one set of
    routes and one collector to add, and one scatter to close.

    Args:
        lagged: the node's lagged store (fed by the host's ``follow``).
        holders: model -> its holder guard (every model: the node holds partitions).
        rows: the baseline's scatter when the node serves (its connections close with it).
    """

    def __init__(
        self,
        lagged: LaggedStore,
        holders: Mapping[str, HolderGuard],
        rows: PartitionedLookup | None,
        ask: Callable[[str], Awaitable[dict]] | None = None,
        spawn: Callable[[str, Awaitable[None]], asyncio.Task] | None = None,
    ) -> None:
        self.lagged = lagged
        self.holders = dict(holders)
        self.rows = rows
        self.ask = ask  # ask(model) -> the coordinator's health page of the model
        # runs the asking as a supervised one-shot (the node's ``Supervisor.spawn``): a
        # failure is logged with its traceback and counted in /ready and /metrics
        self.spawn = spawn
        self._asking: asyncio.Task | None = None

    @classmethod
    def build(
        cls, host: ModelHost, http: ClusterHttp | None, secret: bytes | None
    ) -> GuardHolders | None:
        """The parts for ``host``'s node, or None where none run (guard off, no models, one
        partition, a partition source). The serving guards go into ``host.replica_guards``
        (ticked, shown and exported as a replica's are); ``host.lagged`` is the baseline's."""
        from ekko.guard.scatter_guard import ScatterReplicaGuard

        core = host.core
        cfg = core.config
        g = cfg.guard
        if not (g.enabled and cfg.models and cfg.partitioned) or core.is_source:
            return None
        lagged = host.lagged = LaggedStore(max(m.baseline_lag_s for m in cfg.models))
        coordinator = cfg.source_of(0).name
        log_ = host._open_log()

        def sender(model: str) -> Callable[[str, dict], None]:
            return lambda path, body: host._send(coordinator, f"/v1/models/{model}/{path}", body)

        held = cfg.held(core.name)
        holders = {
            m.name: HolderGuard(core.name, m.name, lagged, core.store, cfg.placement(), held,
                                log_, sender(m.name), host.clock)
            for m in cfg.models
        }  # fmt: skip
        before = TransitionLog.read(core.data_dir / "guard.log")  # a restart: where it was
        for h in holders.values():
            h.resume(before)
        rows = None
        if host.services:
            if http is None or secret is None:
                raise ValueError(f"node {core.name}: the baseline's scatter needs http and secret")
            rows = baseline_rows(core, http, secret, lagged)
            for name, svc in host.services.items():
                host.replica_guards[name] = ScatterReplicaGuard.build(
                    core.name, svc, lagged, g.detector(), g.probation, log_,
                    sender(name), g.shadow_share, g.recovery_auc_tolerance, host.clock,
                    baseline_rows=rows,
                )  # fmt: skip
        ask = None
        spawn = None if host.link is None else host.link.supervisor.spawn
        if http is not None and secret is not None and spawn is not None:

            async def ask(model: str) -> dict:
                url = http.url(coordinator, f"/v1/models/{model}/health")
                async with http.async_client(auth=ClusterAuth(secret), timeout=5.0) as c:
                    r = await c.get(url)
                    r.raise_for_status()
                    return r.json()

        return cls(lagged, holders, rows, ask, spawn)

    def tick(self) -> None:
        """Each guard interval, on the loop: a holder started after a restart asks the
        coordinator whether an incident is in progress or over (one question in flight)."""
        if self.ask is None or self.spawn is None:
            return
        if self._asking is not None and not self._asking.done():
            return
        waiting = [m for m, h in self.holders.items() if h.ask_coordinator]
        if waiting:
            self._asking = self.spawn("guard_holder_ask", self._ask_all(waiting))

    async def _ask_all(self, models: list[str]) -> None:
        assert self.ask is not None
        for m in models:
            try:
                health = await self.ask(m)
            except (httpx.HTTPError, ValueError) as exc:  # asked again next interval
                log.info("guard %s: the coordinator's health page did not answer: %s", m, exc)
                continue
            self.holders[m].coordinator_says(health)

    def poll(self) -> None:
        """After each applied response: has a rollback reached the held partitions?"""
        for h in self.holders.values():
            h.poll()

    def view(self) -> dict[str, dict]:
        """Each model's holder state (``HolderGuard.summary``) as ``ModelHost.guard_view``
        shows a guard's, for a node that holds but does not serve (a serving node shows its
        serving guard's state)."""
        return {m: {"state": f"holder {h.summary()}", "incidents": []}
                for m, h in self.holders.items()}  # fmt: skip

    def routes(self, replicas: Mapping) -> list:
        from ekko.guard.holder_routes import holder_guard_routes

        return holder_guard_routes(replicas, self.holders)

    def collector(self) -> Callable[[], Iterator[Metric]]:
        return holder_metrics(self.holders)

    async def close(self) -> None:
        if self._asking is not None:
            self._asking.cancel()
        if self.rows is not None:
            await self.rows.close()


def holder_metrics(holders: Mapping[str, HolderGuard]) -> Callable[[], Iterator[Metric]]:
    """``ekko_holder_*`` families: each model's baseline at this holder (frozen, rows queued,
    applied and dropped), its restore waiting, restores reported and stale messages."""

    def collect() -> Iterator[Metric]:
        fams = [
            (GaugeMetricFamily, "ekko_holder_baseline_frozen",
             "1 while the holder's baseline is frozen (an incident)",
             lambda h: float(h.lagged.frozen)),
            (GaugeMetricFamily, "ekko_holder_baseline_queued_rows",
             "Rows waiting to reach the holder's baseline", lambda h: h.lagged.rows_queued),
            (CounterMetricFamily, "ekko_holder_baseline_applied_rows",
             "Rows applied to the holder's baseline", lambda h: h.lagged.rows_applied),
            (CounterMetricFamily, "ekko_holder_baseline_dropped_rows",
             "Queued baseline rows dropped as written after a rollback's healthy point",
             lambda h: h.lagged.rows_dropped),
            (GaugeMetricFamily, "ekko_holder_restore_pending",
             "1 while a rollback has not reached the held partitions",
             lambda h: float(h.pending is not None)),
            (CounterMetricFamily, "ekko_holder_restores_reported",
             "Rollbacks this holder reported with its digests", lambda h: h.reported),
            (CounterMetricFamily, "ekko_holder_stale_messages",
             "Guard messages ignored as about an older incident", lambda h: h.stale),
        ]  # fmt: skip
        for family, name, doc, value in fams:
            m = family(name, doc, labels=["model"])
            for model, h in holders.items():
                m.add_metric([model], value(h))
            yield m

    return collect
