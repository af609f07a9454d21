"""Prometheus export of a node, read at scrape time: the one exporter.

Nothing on the sync or write path touches a Prometheus object: each part keeps its own
counts and hands them out as a frozen record (``statistics()``: tables, responder, pullers
per link, the scheduler, each paced session's pacer, the write-ahead log, the supervised
tasks), and the collectors here turn those records into metric families when ``/metrics`` is
scraped. The models a node hosts (serving, training, guards) are exported the same way by
``ekko.node.model_metrics``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from ekko.net.transport import ListenerStats
from ekko.node.core import NodeCore
from ekko.node.supervisor import Supervisor
from ekko.protocol.puller import PullerStats
from ekko.schedule.pacing import PacerStats
from ekko.schedule.scheduler import SchedulerStats
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE

if TYPE_CHECKING:
    from ekko.serve.scatter_policy import PartitionStats

LANE_NAMES = {HIGH_LANE: "high", LOW_LANE: "low", NEW_LANE: "new"}

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10)


class NodeCollector:
    """Yields a node's metrics; registered on the node's own registry."""

    def __init__(
        self, core: NodeCore, extra: list | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        """``clock``: the wall clock the responder's pacers run on (for their tokens now)."""
        self.core = core
        self.extra = extra or []
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        core = self.core
        labels = {"node": core.name, "dc": core.dc, "role": core.role}
        lk, lv = list(labels), list(labels.values())

        h = core.latency
        edges_s = h.edges_ms / 1000.0
        cum = np.cumsum(h.counts)
        buckets = []
        for b in LATENCY_BUCKETS_S:
            idx = int(np.searchsorted(edges_s, b, side="right")) - 1
            buckets.append((str(b), float(cum[idx - 1]) if idx > 0 else 0.0))
        buckets.append(("+Inf", float(h.count)))
        hist = HistogramMetricFamily(
            "ekko_update_latency_seconds",
            "Write at the source to applied at this node",
            labels=lk,
        )
        hist.add_metric(lv, buckets, h.total_ms / 1000.0)
        yield hist

        rows = CounterMetricFamily(
            "ekko_pulled_rows", "Rows pulled per upstream link", labels=[*lk, "link"]
        )
        nbytes = CounterMetricFamily(
            "ekko_pulled_bytes", "Row bytes pulled per upstream link", labels=[*lk, "link"]
        )
        links = core.links.statistics()
        for link, c in links.items():
            rows.add_metric([*lv, link], c.rows_received)
            nbytes.add_metric([*lv, link], c.bytes_received)
        yield rows
        yield nbytes
        yield from _puller_families(links, lk, lv)

        rs = core.responder.statistics()
        yield _counter("ekko_served_rows", "Rows sent to pullers", lk, lv, rs.rows_sent)
        yield _counter("ekko_served_bytes", "Row bytes sent to pullers", lk, lv, rs.bytes_sent)
        yield _counter("ekko_pulls", "Pull requests answered or parked", lk, lv, rs.pulls)
        yield _gauge("ekko_parked_pulls", "Long-polls waiting for a change", lk, lv, rs.parked)
        yield _gauge("ekko_sessions", "Connected pullers", lk, lv, rs.sessions)
        yield _counter(
            "ekko_shared_chunks",
            "Chunks reused from another session's same pull",
            lk,
            lv,
            rs.shared_chunks,
        )
        yield from _pacing_families(core.responder.pacing(self.clock()), lk, lv)
        scheduler = core.port.scheduler
        if scheduler is not None:
            yield from _scheduler_families(scheduler.statistics(), lk, lv)

        hits = CounterMetricFamily(
            "ekko_cache_hits", "Pulls answered from the update cache", labels=[*lk, "table"]
        )
        scans = CounterMetricFamily(
            "ekko_full_scans", "Pulls answered by a full scan", labels=[*lk, "table"]
        )
        tab_rows = GaugeMetricFamily("ekko_table_rows", "Rows held", labels=[*lk, "table"])
        tombs = GaugeMetricFamily(
            "ekko_table_tombstones", "Deleted keys held as tombstones", labels=[*lk, "table"]
        )
        purged = CounterMetricFamily(
            "ekko_table_tombstones_purged",
            "Tombstones forgotten once every holder had them",
            labels=[*lk, "table"],
        )
        reconciled = CounterMetricFamily(
            "ekko_table_rows_reconciled",
            "Rows a reconcile dropped: deleted upstream while this holder was away",
            labels=[*lk, "table"],
        )
        ratio = GaugeMetricFamily(
            "ekko_cache_hit_ratio", "Cache hits / (hits + full scans)", labels=[*lk, "table"]
        )
        known = GaugeMetricFamily(
            "ekko_knowledge_versions",
            "Sum of per-shard knowledge; the source's value minus a replica's is its lag in "
            "row versions",
            labels=[*lk, "table"],
        )
        for name, t in core.store.tables.items():
            known.add_metric([*lv, name], float(t.knowledge.max(axis=1).sum()))
            st = t.statistics()
            hits.add_metric([*lv, name], st.cache_hits)
            scans.add_metric([*lv, name], st.full_scans)
            tab_rows.add_metric([*lv, name], st.rows)
            tombs.add_metric([*lv, name], st.tombstones)
            purged.add_metric([*lv, name], st.tombstones_purged)
            reconciled.add_metric([*lv, name], st.rows_reconciled)
            total = st.cache_hits + st.full_scans
            ratio.add_metric([*lv, name], st.cache_hits / total if total else 1.0)
        yield hits
        yield scans
        yield tab_rows
        yield tombs
        yield purged
        yield reconciled
        yield ratio
        yield known
        reported = CounterMetricFamily(
            "ekko_traffic_reported",
            "Predictions per model reported by this node's pullers (own and downstream)",
            labels=[*lk, "model"],
        )
        for model, n in core.traffic_reported.items():
            reported.add_metric([*lv, model], n)
        yield reported
        yield _counter(
            "ekko_store_rebuilds", "Whole-store rebuilds from a new lineage", lk, lv, core.rebuilds
        )
        if core.is_source:
            accepting = core.not_ready is None
            yield _gauge(
                "ekko_accepting_writes", "1 once the source takes writes", lk, lv, accepting
            )
        if core.journal is not None:
            ws = core.journal.wal.statistics()
            yield _counter("ekko_wal_records", "Records appended to the log", lk, lv, ws.appended)
            yield _counter("ekko_wal_fsyncs", "Group commits (one fsync each)", lk, lv, ws.fsyncs)
            yield _counter("ekko_wal_bytes", "Bytes written to the log", lk, lv, ws.bytes_written)
            yield _gauge("ekko_wal_durable_seq", "Last record on disk", lk, lv, ws.durable_seq)
            failed = core.journal.wal.failed is not None
            yield _gauge("ekko_wal_failed", "1 once the log cannot write", lk, lv, failed)
        for fn in self.extra:
            yield from fn()


def _per(
    kind: type[Metric], name: str, doc: str, lk: list[str], lv: list[str], label: str,
    values: Mapping[str, float],
) -> Metric:  # fmt: skip
    m = kind(name, doc, labels=[*lk, label])
    for key, value in values.items():
        m.add_metric([*lv, key], float(value))
    return m


def _puller_families(
    links: Mapping[str, PullerStats], lk: list[str], lv: list[str]
) -> Iterator[Metric]:
    def each(attr: str) -> dict[str, float]:
        return {link: getattr(st, attr) for link, st in links.items()}

    yield _per(GaugeMetricFamily, "ekko_puller_pending_chunks",
               "Chunk ranges held until the range below them arrives, per upstream link",
               lk, lv, "link", each("pending_chunks"))  # fmt: skip
    yield _per(CounterMetricFamily, "ekko_puller_resyncs",
               "Cursors restated because the upstream's memory of a session disagreed",
               lk, lv, "link", each("resyncs"))  # fmt: skip
    yield _per(CounterMetricFamily, "ekko_puller_gaps",
               "Chunk ranges that arrived ahead of a missing one", lk, lv, "link",
               each("gaps"))  # fmt: skip
    yield _per(CounterMetricFamily, "ekko_puller_source_restarts",
               "Source restarts met on a link: knowledge taken back to what the old source "
               "process's disk backed, the rest pulled again", lk, lv, "link",
               each("epoch_changes"))  # fmt: skip
    yield _per(CounterMetricFamily, "ekko_puller_timeouts",
               "Pulls that got no answer in time", lk, lv, "link", each("timeouts"))  # fmt: skip


def _pacing_families(
    pacers: Mapping[int, PacerStats], lk: list[str], lv: list[str]
) -> Iterator[Metric]:
    """Per paced session (the id the log names when the puller connects)."""
    by = {str(sid): st for sid, st in pacers.items()}
    yield _per(GaugeMetricFamily, "ekko_pacer_rate_bytes",
               "Bytes/s a paced session is answered at", lk, lv, "session",
               {k: st.rate_bytes_per_s for k, st in by.items()})  # fmt: skip
    yield _per(GaugeMetricFamily, "ekko_pacer_tokens_bytes",
               "Bytes a paced session's link may carry now (negative: sent ahead of its rate)",
               lk, lv, "session", {k: st.tokens for k, st in by.items()})  # fmt: skip
    yield _per(GaugeMetricFamily, "ekko_pacer_queued_bytes",
               "Bytes sent ahead of a paced link's rate, still queued on it (about)",
               lk, lv, "session", {k: st.queued_bytes for k, st in by.items()})  # fmt: skip
    yield _per(CounterMetricFamily, "ekko_pacer_sent_bytes",
               "Bytes a paced session's answers put on its link", lk, lv, "session",
               {k: st.bytes_sent for k, st in by.items()})  # fmt: skip


def _scheduler_families(st: SchedulerStats, lk: list[str], lv: list[str]) -> Iterator[Metric]:
    lanes = {LANE_NAMES[lane]: n for lane, n in enumerate(st.rows_by_lane)}
    yield _per(CounterMetricFamily, "ekko_scheduler_rows",
               "Rows the source wrote, by the lane the scheduler put them in (released held "
               "rows included)", lk, lv, "lane", lanes)  # fmt: skip
    if math.isfinite(st.threshold):
        yield _gauge("ekko_scheduler_threshold", "Priority at which a row goes in the high lane",
                     lk, lv, st.threshold)  # fmt: skip
    yield _gauge("ekko_scheduler_deferred_rows", "Rows held back by deferral now", lk, lv,
                 st.rows_held)  # fmt: skip
    yield _counter("ekko_scheduler_deferrals", "Rows deferral started holding", lk, lv,
                   st.rows_deferred)  # fmt: skip
    yield _counter("ekko_scheduler_released", "Held rows released", lk, lv, st.rows_released)


def _counter(name: str, doc: str, lk: list[str], lv: list[str], value: float) -> Metric:
    m = CounterMetricFamily(name, doc, labels=lk)
    m.add_metric(lv, value)
    return m


def _gauge(name: str, doc: str, lk: list[str], lv: list[str], value: float) -> Metric:
    m = GaugeMetricFamily(name, doc, labels=lk)
    m.add_metric(lv, value)
    return m


def task_metrics(supervisor: Supervisor) -> Callable[[], Iterator[Metric]]:
    """``ekko_task_restarts_total``, ``ekko_task_failures_total`` and ``ekko_task_up`` of
    the node's supervised background tasks."""

    def collect() -> Iterator[Metric]:
        stats = supervisor.statistics()
        yield _per(CounterMetricFamily, "ekko_task_restarts",
                   "Restarts of a background task after it failed", [], [], "task",
                   {n: s.restarts for n, s in stats.items()})  # fmt: skip
        yield _per(CounterMetricFamily, "ekko_task_failures",
                   "Exceptions raised by a background task", [], [], "task",
                   {n: s.failures for n, s in stats.items()})  # fmt: skip
        yield _per(GaugeMetricFamily, "ekko_task_up",
                   "1 while a background task runs, 0 while it waits to restart", [], [],
                   "task", {n: s.up for n, s in stats.items()})  # fmt: skip

    return collect


def sync_port_metrics(
    node: str, stats: Callable[[], ListenerStats | None]
) -> Callable[[], Iterator[Metric]]:
    """A collector of the sync listener's handshake outcomes (refused and evicted peers are
    counted, never silent) and of its sessions that failed."""

    def collect() -> Iterator[Metric]:
        s = stats()
        if s is None:
            return
        m = CounterMetricFamily(
            "ekko_sync_handshakes",
            "Sync-port handshakes by outcome (refused includes evicted: a pending handshake "
            "dropped to admit a newer connection when max_pending were waiting)",
            labels=["node", "outcome"],
        )
        m.add_metric([node, "authenticated"], s.authenticated)
        m.add_metric([node, "refused"], s.auth_failures)
        m.add_metric([node, "evicted"], s.evicted)
        yield m
        m = CounterMetricFamily(
            "ekko_sync_session_errors",
            "Authenticated sync sessions that ended in an exception of this node's (logged "
            "with its traceback); a peer's bad frame or message is refused by name instead",
            labels=["node"],
        )
        m.add_metric([node], s.handler_errors)
        yield m

    return collect


def scatter_metrics(
    node: str,
    stats: Callable[[], Sequence[PartitionStats]],
    coalesced: Callable[[], tuple[int, int, int]] | None = None,
) -> Callable[[], Iterator[Metric]]:
    """A collector of a serving node's scatter-gather lookups per partition (issue 17):
    batches asked and answered, hedges and retries sent, batches no holder answered, and the
    current hedge delay — what says a partition's holders are slow or gone before a 503 does."""
    counters = (
        ("requests", "Batches whose rows were asked of the partition's holders"),
        ("answered", "Batches a holder of the partition answered"),
        ("hedges", "Requests hedged to the next holder after the partition's p95"),
        ("retries", "Requests retried on the next holder after a holder failed"),
        ("unavailable", "Batches no holder of the partition answered (HTTP 503)"),
    )

    def collect() -> Iterator[Metric]:
        got = stats()
        for attr, doc in counters:
            m = CounterMetricFamily(f"ekko_scatter_{attr}", doc, labels=["node", "partition"])
            for s in got:
                m.add_metric([node, str(s.partition)], getattr(s, attr))
            yield m
        m = GaugeMetricFamily("ekko_scatter_hedge_after_seconds",
                              "How long a request waits before it is hedged (its partition's "
                              "p95 of recent answers)", labels=["node", "partition"])  # fmt: skip
        for s in got:
            m.add_metric([node, str(s.partition)], s.hedge_after_s)
        yield m
        if coalesced is not None:
            scatters, merged, gave_up = coalesced()
            for name, value, doc in (
                ("scatters", scatters, "Scatters sent (lookups merged into one count once)"),
                ("lookups_merged", merged, "Lookups sent merged with others that queued "
                 "behind a scatter in flight"),
                ("lookups_expired_queued", gave_up, "Lookups whose deadline passed while "
                 "they queued behind a scatter in flight (answered 503)"),
            ):  # fmt: skip
                m = CounterMetricFamily(f"ekko_scatter_{name}", doc, labels=["node"])
                m.add_metric([node], value)
                yield m

    return collect


def node_registry(core: NodeCore, extra: list | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(core, extra))
    return registry
