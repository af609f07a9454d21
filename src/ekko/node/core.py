"""One node's state without sockets: store, responder, role, writes, status.

The asyncio runner (``ekko.node.runner``) adds the sockets, timers and HTTP around it; tests
can drive a ``NodeCore`` directly.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ekko.net.wan import WanProfile
from ekko.node import config_partitions
from ekko.node.config import ClusterConfig
from ekko.node.data_dir import claim_data_dir
from ekko.node.links import PullLinks
from ekko.protocol.puller import PullerConfig
from ekko.protocol.responder import Responder, ResponderConfig
from ekko.protocol.traffic import TrafficTally
from ekko.quality.latency import LatencyHistogram
from ekko.schedule.write_port import WritePort
from ekko.store import Store, Table
from ekko.store.clock import SYSTEM_CLOCK, Clock
from ekko.store.holding import Holding
from ekko.store.journal import StoreJournal, open_durable
from ekko.store.settled import Mark
from ekko.store.sources import shards_digest
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE, TableSpec

log = logging.getLogger(__name__)


class NotSourceError(RuntimeError):
    """Writes are accepted only by the source node, the origin of versions."""


class NotReadyError(RuntimeError):
    """The source cannot take writes yet (it is rebuilding from replicas); the message says
    why. Answered 503 so a client retries."""


@dataclass
class NodeCore:
    """Store + protocol state of one node, by name, in a cluster config."""

    config: ClusterConfig
    name: str
    base_dir: Path
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    links: PullLinks = field(default_factory=PullLinks)  # what was pulled, per upstream
    # Start the source from the replicas, setting its data files aside (a corrupt snapshot
    # or log, or a data dir known to be lost).
    rebuild: bool = False
    # Set the data dir aside and start clean (``ekko node --fresh``): the operator's answer
    # to a data dir made for another cluster (``node.data_dir``).
    fresh: bool = False
    # Called after every write through the port (the runner wakes parked long-poll pulls).
    on_written: Callable[[], None] | None = None
    # What the write path stamps rows with, and status and traffic shares read (a fake
    # clock in tests).
    clock: Clock = SYSTEM_CLOCK
    # This node's cumulative predictions per model (its ModelHost's), for the traffic report.
    served: Callable[[], Mapping[str, int]] | None = None

    def __post_init__(self) -> None:
        self.node = self.config.node(self.name)
        self.role = self.config.role(self.name)
        self.dc = self.node.dc
        self.origin = self.config.nodes.index(self.node)
        self.data_dir = self.config.path(self.config.cluster.data_dir, self.base_dir) / self.name
        self.snapshot_path = self.data_dir / "store.snapshot"
        self.wal_dir = self.data_dir / "wal"
        self.journal: StoreJournal | None = None
        # Why writes are refused (None: accepted). A source recovers before it takes any.
        self.not_ready: str | None = "recovering" if self.role == "source" else None
        self.closed = False  # the log closed (the node stops): no write may be taken
        self.restored_rows = 0  # rows the source found in its own snapshot and log
        sourced = (
            tuple(self.config.held(self.name)) if self.role == "source" else None
        )  # a source is the source of every partition it holds (config_partitions)
        claim_data_dir(self.data_dir, self.config.cluster.id, fresh=self.fresh, sourced=sourced)
        self.store = self._open_store()
        if self.role == "source":
            self.epoch = secrets.randbits(62) | 1  # this process, in every answer's mark
            self.store.mark_source = self._mark
        self.responder = self._responder()
        # The source's one write port: HTTP writes, the trainers, releases and restores.
        self.port = WritePort(
            self.store,
            self.config.scheduler.scheduler() if self.role == "source" else None,
            on_written=self.on_written,
            clock=self.clock,
        )
        self.upstream_name: str | None = None
        # Partitioned: where each held partition is pulled from now (None: no link up).
        self.upstream_of: dict[int, str | None] = dict.fromkeys(self.config.held(self.name))
        self.rebuilds = 0  # whole-store rebuilds from a new upstream lineage (a full copy)
        # Inference traffic owed upstream (a replica) and heard from pullers (any node).
        self.traffic = TrafficTally(self.served)
        self.traffic_reported: Counter[str] = Counter()
        self.started_at = self.clock.wall()
        self.copied_at: float | None = None  # checkpoint replicas: write time of the copy

    def _mark(self) -> Mark:
        """The source's mark on each answer (``ekko.store.settled``): its log written and
        on disk. Recovering, or without a log, nothing it serves is settled (cut above
        durable): a restart then has replicas pull again what they hold."""
        if self.journal is None or self.not_ready is not None:
            return Mark(self.epoch, 1, 0)
        wal = self.journal.wal
        return Mark(self.epoch, wal.last_seq, wal.durable_seq)

    def _responder(self) -> Responder:
        s = self.config.sync
        return Responder(
            self.store,
            ResponderConfig(
                use_shard_version=s.use_shard_version,
                use_cache=s.use_cache,
                long_poll=s.wait_ms > 0,
                holder_horizon_s=s.tombstone_horizon_s,
            ),
            self.config.placement() if self.config.partitioned else None,
        )

    def _open_store(self) -> Store:
        """At the source: the snapshot plus the write-ahead log, checked (a corrupt file
        raises ``SnapshotError``/``WalError`` naming it: never a silent empty start)."""
        cache = self.config.sync.cache_capacity
        if self.role != "source":
            store = Store(origin=self.origin, cache_capacity=cache)
            store.set_holding(self.holding())
            if self.config.partitioned:  # a history per source of its partitions
                groups = config_partitions.source_groups(self.config, self.node)
                store.set_sources(self.config.placement(), groups)
            return store
        if self.rebuild:
            self._set_aside()
        d = self.config.durability
        if d.wal:
            store, self.journal, _ = open_durable(
                self.snapshot_path,
                self.wal_dir,
                origin=self.origin,
                cache_capacity=cache,
                window_s=d.wal_window_ms / 1000,
                lazy_s=d.wal_lazy_ms / 1000,
            )
        elif self.snapshot_path.exists():
            store = Store.load(self.snapshot_path, cache_capacity=cache)
        else:
            store = Store(origin=self.origin, cache_capacity=cache)
        store.set_holding(self.holding())
        self.restored_rows = sum(t.rows for t in store.tables.values())
        if self.restored_rows or store.lineage:
            log.info(
                "restored %d rows (lineage %x) from %s", self.restored_rows, store.lineage,
                self.data_dir,
            )  # fmt: skip
        for t in self.config.tables:
            store.create_table(t.spec(), initial_rows=t.initial_rows).max_abs = t.max_abs
        return store

    def holding(self) -> Holding | None:
        """The shards and memory this node's store may hold: its partitions' shards (in a
        partitioned cluster), within ``max_memory_mb``; None: any row, as before."""
        cfg, budget = self.config, self.node.max_memory_mb
        if not cfg.partitioned and budget is None:
            return None
        return Holding(
            self.name,
            cfg.placement() if cfg.partitioned else None,
            cfg.held(self.name) if cfg.partitioned else None,
            max_bytes=None if budget is None else int(budget * (1 << 20)),
            owner_of=lambda p: f"its source is {cfg.source_of(p).name}",
        )

    def _set_aside(self) -> None:
        """Rename the source's snapshot and log so a rebuild starts empty, keeping them."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for p in (self.snapshot_path, self.wal_dir):
            if p.exists():
                aside = p.with_name(f"{p.name}.set-aside-{stamp}")
                p.rename(aside)
                log.warning("rebuild from replicas: %s set aside as %s", p, aside)

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    def puller_config(
        self, wan: WanProfile | None = None, partitions: tuple[int, ...] | None = None
    ) -> PullerConfig:
        """How to pull over a link: ``wan`` is its profile (None: a LAN link); in a
        partitioned cluster, of ``partitions`` only (None: every shard)."""
        s = self.config.sync
        return PullerConfig(
            partitions=partitions if self.config.partitioned else None,
            codec=s.lan_codec if wan is None else s.wan_codec,
            floor_report_ms=max(1, round(s.tombstone_report_s * 1000)),
            max_bytes=s.max_bytes,
            wait_ms=s.wait_ms,
            window=s.window,
            poll_interval_ms=s.poll_interval_ms,
            request_timeout_ms=s.request_timeout_ms,
        )

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Write rows at the source; raises on a replica, an unknown table or bad rows, and
        ``NotReadyError`` while the source recovers. Durable once ``wait_durable`` returns."""
        self.require_source("write to")
        self._require_writable()
        now_ns = self.clock.ns()
        return self.port.write_rows(table, keys, values, now=now_ns / 1e9, now_ns=now_ns)

    def delete(self, table: str, keys: np.ndarray) -> np.ndarray:
        """Delete keys at the source (tombstones that reach every replica); raises as
        ``write`` does. Durable once ``wait_durable`` returns."""
        self.require_source("delete at")
        self._require_writable()
        return self.port.delete(table, keys, self.clock.ns())

    def _require_writable(self) -> None:
        if self.closed:  # without its log a write is in memory only: never acknowledge it
            raise NotReadyError(f"source {self.name!r} takes no writes: it is stopping")
        if self.not_ready is not None:
            raise NotReadyError(f"source {self.name!r} takes no writes yet: {self.not_ready}")
        if self.journal is not None and self.journal.wal.failed is not None:
            raise NotReadyError(
                f"source {self.name!r} takes no writes: its write-ahead log failed "
                f"({self.journal.wal.failed})"
            )

    async def create_table(self, spec: TableSpec, *, initial_rows: int) -> bool:
        """Create ``spec`` at the source (True), or find it there as it is (False; another
        spec of the name raises ``TableConflictError``); returns once the table is on disk,
        as a write is acknowledged: a new table is logged as a write of no rows (its spec is
        all a replayed write needs to create it), so a crash before the next snapshot keeps
        it."""
        self.require_source("create tables at")
        self._require_writable()
        created = spec.name not in self.store.tables
        self.store.create_table(spec, initial_rows=initial_rows)
        if created and self.journal is not None:
            self.journal.log_created(spec, self.clock.ns())
        await self.wait_durable()
        return created

    def down(self) -> dict[str, str]:
        """What of the node's own machinery stopped working (for ``/ready``)."""
        if self.journal is not None and self.journal.wal.failed is not None:
            return {"wal": f"write-ahead log failed: {self.journal.wal.failed}"}
        return {}

    async def wait_durable(self) -> None:
        """Return once every write so far is on disk (at once without a write-ahead log)."""
        if self.journal is not None:
            await self.journal.wait_durable()

    def require_source(self, what: str) -> None:
        """Raise ``NotSourceError`` naming the source unless this node is it."""
        if not self.is_source:
            raise NotSourceError(
                f"node {self.name!r} is a {self.role}; {what} the source "
                f"{self.config.source.name!r}"
            )

    def report_traffic(self, peer: str, counts: Mapping[str, int]) -> None:
        """``peer`` reported predictions per model: the source's scheduler weighs each
        model's updates by its share (p_m); any other node passes the counts upstream with
        its next pull."""
        self.traffic_reported.update(counts)
        if not self.is_source:
            self.traffic.add(counts)
            return
        scheduler = self.port.scheduler
        if scheduler is not None:
            now = self.clock.wall()
            for model, n in counts.items():
                scheduler.traffic.report(model, n, now)

    def register_model_tables(self, model: str, tables: list[str]) -> None:
        """At the source: ``tables`` belong to ``model``, whose traffic share weighs them."""
        scheduler = self.port.scheduler
        if scheduler is not None:
            for t in tables:
                scheduler.traffic.register(t, model)

    def save_snapshot(self) -> None:
        """Snapshot the store; with a write-ahead log, drop the records it covers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.journal is not None:
            self.journal.checkpoint(self.snapshot_path)
        else:
            self.store.save(self.snapshot_path)

    def close(self) -> None:
        """Flush and close the write-ahead log (after the last snapshot); later writes are
        refused."""
        self.closed = True
        if self.journal is not None:
            self.journal.close()
            self.journal = None

    def export_snapshot(self) -> bytes:
        """A full copy of the store as snapshot bytes (what a checkpoint replica loads)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "export.snapshot"
        self.store.save(path)
        return path.read_bytes()

    def load_copy(self, data: bytes, copied_at: float) -> Store:
        """Replace the store by a full copy (snapshot bytes); the old one stays on error."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        path = self.data_dir / "copy.snapshot"
        path.write_bytes(data)
        store = Store.load(path, cache_capacity=self.config.sync.cache_capacity)
        self.store = store
        self.responder = self._responder()
        self.copied_at = copied_at
        return store

    def read_rows(self, table: str, keys: np.ndarray) -> dict:
        values, versions, found = self.store.table(table).lookup(keys)
        return {
            "table": table,
            "rows": [
                {"key": int(k), "found": bool(f), "version": int(v), "value": val.tolist()}
                if f
                else {"key": int(k), "found": False}
                for k, f, v, val in zip(keys, found, versions, values, strict=True)
            ],
        }

    def status(self) -> dict:
        tables = {}
        for name, t in self.store.tables.items():
            st = t.statistics()
            tables[name] = {
                "rows": t.rows,
                "tombstones": t.tombstones,
                "tombstones_purged": st.tombstones_purged,
                "rows_reconciled": st.rows_reconciled,
                "dim": t.dim,
                "shards": t.num_shards,
                "digest": f"{t.digest():016x}",
                # Partitioned: per held partition (what its source's digest is compared with).
                "partition_digests": self._partition_digests(t),
                "knowledge": {
                    "high": int(t.knowledge[:, HIGH_LANE].sum()),
                    "low": int(t.knowledge[:, LOW_LANE].sum()),
                    "new": int(t.knowledge[:, NEW_LANE].sum()),
                    # the least-advanced shard, by the furthest of its lanes
                    "min_shard": int(t.knowledge.max(axis=1).min()) if t.num_shards else 0,
                },
                "cache_hits": st.cache_hits,
                "full_scans": st.full_scans,
            }
        return {
            "node": self.name,
            "dc": self.dc,
            "role": self.role,
            "upstream": self.upstream_name,
            "partitions": list(self.config.held(self.name)),
            "uptime_s": round(self.clock.wall() - self.started_at, 3),
            "copied_at": self.copied_at,
            "catalog_version": self.store.catalog_version,
            "lineage": self.lineage_text(),
            "lineages": {str(p): f"{v:x}" for p, v in self.store.lineages().items()},
            "rebuilds": self.rebuilds,
            "accepting_writes": self.not_ready is None if self.is_source else None,
            "wal": vars(self.journal.wal.statistics()) if self.journal is not None else None,
            "tables": tables,
            "latency": self.latency.summary(),
            "links": self.links.as_json(),
            "served": self._served_status(),
            "traffic": self._traffic_status(),
        }

    def _partition_digests(self, table: Table) -> dict[str, str] | None:
        if not self.config.partitioned:
            return None
        parts = self.config.placement().partitions_of(table.name, table.num_shards)
        return {
            str(p): f"{shards_digest(table, parts == p):016x}" for p in self.config.held(self.name)
        }

    def lineage_text(self) -> str:
        """The store's lineage in hex; a store of several sources' partitions, each
        source's (``p0,p2:<hex> p1:<hex>``)."""
        store = self.store
        if not store.multi_source:
            return f"{store.lineage:x}"
        by: dict[int, list[int]] = {}
        for p, v in store.lineages().items():
            by.setdefault(v, []).append(p)
        return " ".join(f"p{','.join(map(str, ps))}:{v:x}" for v, ps in by.items())

    def _served_status(self) -> dict[str, int]:
        """What this node's responder sent its pullers (rows and bytes, cumulative)."""
        rs = self.responder.statistics()
        return {"rows": rs.rows_sent, "bytes": rs.bytes_sent, "sessions": rs.sessions}

    def _traffic_status(self) -> dict:
        out: dict = {"reported": dict(self.traffic_reported)}
        scheduler = self.port.scheduler
        if scheduler is not None:
            out["shares"] = dict(scheduler.traffic.shares())
        return out
