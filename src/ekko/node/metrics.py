"""Prometheus export of a node's statistics, read at scrape time.

Nothing on the sync hot path touches a Prometheus object: the collector turns the stats the
node already keeps (store statistics, link counters, the latency histogram) into metric
families when ``/metrics`` is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.3, 0.5, 1, 2, 5, 10)


class NodeCollector:
    """Yields a node's metrics; registered on the node's own registry."""

    def __init__(self, core: NodeCore, extra: list | None = None) -> None:
        self.core = core
        self.extra = extra or []

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
        for link, c in core.links.statistics().items():
            rows.add_metric([*lv, link], c.rows_received)
            nbytes.add_metric([*lv, link], c.bytes_received)
        yield rows
        yield nbytes

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

        hits = CounterMetricFamily(
            "ekko_cache_hits", "Pulls answered from the update cache", labels=[*lk, "table"]
        )
        scans = CounterMetricFamily(
            "ekko_full_scans", "Pulls answered by a full scan", labels=[*lk, "table"]
        )
        tab_rows = GaugeMetricFamily("ekko_table_rows", "Rows held", labels=[*lk, "table"])
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
            total = st.cache_hits + st.full_scans
            ratio.add_metric([*lv, name], st.cache_hits / total if total else 1.0)
        yield hits
        yield scans
        yield tab_rows
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


def _counter(name: str, doc: str, lk: list[str], lv: list[str], value: float) -> Metric:
    m = CounterMetricFamily(name, doc, labels=lk)
    m.add_metric(lv, value)
    return m


def _gauge(name: str, doc: str, lk: list[str], lv: list[str], value: float) -> Metric:
    m = GaugeMetricFamily(name, doc, labels=lk)
    m.add_metric(lv, value)
    return m


def sync_port_metrics(
    node: str, stats: Callable[[], ListenerStats | None]
) -> Callable[[], Iterator[Metric]]:
    """A collector of the sync listener's handshake outcomes (refused and evicted peers are
    counted, never silent)."""

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

    return collect


def node_registry(core: NodeCore, extra: list | None = None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(core, extra))
    return registry
