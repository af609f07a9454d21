"""Where a sharded rank's rows go on a partitioned cluster: each row to the source of the
partition that holds its (table, shard), over one sink per partition (issue 17).

A rank owns the rows of the partitions co-located with it (``RowPlacement`` with the cluster's
``Placement``: partition ``p`` belongs to rank ``p % W``) and writes them to those
partitions' sources; rank 0 also writes the dense tensors, to whichever partition's source the
cluster's placement puts each dense table in. Why not pin the dense tables to partition 0:
the serving nodes find a dense table's row by the cluster's ``Placement`` (scatter-gather
reads key 0 of each dense table from the partition holding shard 0), and the cluster config
has no per-table override — a pin the trainer alone knew would put the rows where no reader
looks. So the router follows the cluster's placement for every table, and rank 0 opens a sink
to each partition holding a dense table.

``OwnedRowsSink`` turns a rank's one local table into the model's tables; ``PartitionRouter``
is the ``Sink`` it writes into on a partitioned cluster; ``PartitionSources``
opens a ``RemoteSink`` (binary write streams) to a partition's source from a cluster config,
picklable so the spawned ranks can call it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

from ekko.client.base import Target
from ekko.client.cluster import ClusterFile
from ekko.client.credentials import Credentials
from ekko.client.errors import Quarantined
from ekko.client.remote_sink import RemoteSink
from ekko.client.stream import DEFAULT_WINDOW
from ekko.client.sync import Client
from ekko.store import shard_of
from ekko.store.placement import Placement
from ekko.store.spec import Sink, TableSpec

log = logging.getLogger(__name__)

OWNED_ROWS = "sharded/owned_rows"
"""The publisher's name for a rank's one local table; ``OwnedRowsSink`` never creates it."""


class OwnedRowsSink:
    """A ``Sink`` that turns writes of a rank's local table into writes of the model's tables.

    Why: a rank holds the rows it owns of every table in one local table (one lookup, one
    sparse gradient, one optimizer call a step instead of one per table); the publisher
    reports local row numbers of ``OWNED_ROWS``, the store wants ``emb_{i}`` keyed by the
    model's row keys. Other tables (the dense ones) pass through.

    Args:
        sink: the rank's sink.
        names: the model's store table of each feature.
        table_of_row, key_of_row: int64 [n]: feature and key of each local row, rows grouped
            by feature in order.
    """

    def __init__(
        self, sink: Sink, names: list[str], table_of_row: np.ndarray, key_of_row: np.ndarray
    ) -> None:
        self.sink = sink
        self.names = names
        self.table_of_row = table_of_row
        self.key_of_row = key_of_row

    def create_table(self, spec: TableSpec) -> None:
        if spec.name != OWNED_ROWS:
            self.sink.create_table(spec)
            return
        for name in self.names:
            self.sink.create_table(msgspec.structs.replace(spec, name=name))

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        if table != OWNED_ROWS:
            self.sink.write(table, keys, values)
            return
        order = np.argsort(self.table_of_row[keys], kind="stable")
        keys, values = keys[order], values[order]
        bounds = np.searchsorted(self.table_of_row[keys], np.arange(len(self.names) + 1))
        for i, name in enumerate(self.names):
            part = slice(bounds[i], bounds[i + 1])
            if part.stop > part.start:
                self.sink.write(name, self.key_of_row[keys[part]], values[part])


class PartitionRouter:
    """A ``Sink`` that splits every write by partition and hands each part to that
    partition's sink.

    Why: a rank's publisher writes whole tables (``emb_{i}``, the dense tensors) while each
    partition's source takes only its own shards (it refuses the others, 421). ``create_table``
    goes to every sink: each partition's source (and through it each holder) knows every
    table's spec, which a serving node needs to find the partition of a row it lacks. A row
    of a partition the router has no sink for is a bug in the caller's ownership (a
    ``ValueError`` naming table, shard and partition), never a silent drop.

    Args:
        placement: the cluster's placement.
        sinks: partition -> the sink to its source.
    """

    def __init__(self, placement: Placement, sinks: Mapping[int, Sink]) -> None:
        bad = [p for p in sinks if not 0 <= p < placement.partitions]
        if bad:
            raise ValueError(
                f"PartitionRouter: partition {bad[0]} is not in [0, {placement.partitions})"
            )
        if not sinks:
            raise ValueError("PartitionRouter needs the sink of at least one partition")
        self.placement = placement
        self.sinks = dict(sorted(sinks.items()))
        self._shards: dict[str, int] = {}

    def create_table(self, spec: TableSpec) -> None:
        for sink in self.sinks.values():
            sink.create_table(spec)
        self._shards[spec.name] = spec.num_shards

    def split(self, table: str, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(partition, positions of ``keys`` in it), for each partition ``keys`` touch."""
        shards_n = self._shards.get(table)
        if shards_n is None:
            raise KeyError(f"write to table {table!r} before create_table")
        shards = shard_of(keys, shards_n)
        parts = self.placement.partitions_of(table, shards_n)[shards]
        out = []
        for p in np.unique(parts).tolist():
            if p not in self.sinks:
                shard = int(shards[parts == p][0])
                raise ValueError(
                    f"table {table!r} shard {shard} is in partition {p}, which this rank does "
                    f"not publish to (it has sinks for {list(self.sinks)}): the ranks' "
                    "placement differs from the cluster's"
                )
            out.append((p, np.flatnonzero(parts == p)))
        return out

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        for p, where in self.split(table, keys):
            self.sinks[p].write(table, keys[where], values[where])

    def delete(self, table: str, keys: np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.int64)
        for p, where in self.split(table, keys):
            self.sinks[p].delete(table, keys[where])  # type: ignore[attr-defined]

    def flush(self) -> None:
        """Every partition's sink acknowledged what it was given (those that can say so)."""
        for sink in self.sinks.values():
            call = getattr(sink, "flush", None)
            if callable(call):
                call()

    def close(self) -> None:
        """Close every partition's sink (flushing first, when it does). A sink held by a
        rollback's quarantine closes without its dropped rows (they were counted)."""
        for p, sink in self.sinks.items():
            call = getattr(sink, "close", None)
            if callable(call):
                try:
                    call()
                except Quarantined as q:
                    log.warning("partition %d's sink closed while quarantined: %s", p, q)

    # -- a rollback's quarantine (``RemoteSink.hold``; sinks without it have nothing queued)

    @property
    def quarantine(self) -> Quarantined | None:
        """The refusal of the highest epoch any partition's sink is held by, or None."""
        held = [q for s in self.sinks.values() if (q := getattr(s, "quarantine", None))]
        return max(held, key=lambda q: (q.epoch, q.until)) if held else None

    def hold(self, quarantine: Quarantined) -> None:
        """Hold every partition's sink (their queued writes dropped) until ``resume``."""
        for sink in self.sinks.values():
            call = getattr(sink, "hold", None)
            if callable(call):
                call(quarantine)

    def resume(self, epoch: int) -> None:
        """Release every partition's sink held by ``epoch`` or an older one."""
        for sink in self.sinks.values():
            call = getattr(sink, "resume", None)
            if callable(call):
                call(epoch)


class _ClosingSink(RemoteSink):
    """A ``RemoteSink`` that owns its client: closing the sink closes the client too."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.client.close()


@dataclass(frozen=True)
class PartitionSources:
    """Opens the sink to a partition's source: ``RemoteSink`` over binary write streams,
    signed with the cluster's secret (``PartitionSources(...)(p)``).

    Why a dataclass and not a closure: the ranks are spawned processes and the factory is
    pickled to them. ``sources`` maps each partition to its source's node name
    (``ClusterConfig.source_of(p).name``, which the node layer computes; this layer reads
    only the client's view of the config).
    """

    config: Path
    sources: Mapping[int, str]
    window: int = DEFAULT_WINDOW

    def __call__(self, partition: int) -> RemoteSink:
        name = self.sources.get(partition)
        if name is None:
            raise ValueError(
                f"no source named for partition {partition} (known: {sorted(self.sources)})"
            )
        cluster = ClusterFile.read(self.config)
        node = cluster.endpoint(name)
        target = Target(
            writes=node,
            reads=node,
            credentials=Credentials.from_secret_file(cluster.secret_file),
            verify=cluster.verify(),
            tls=cluster.ca is not None,
        )
        return _ClosingSink(Client(target), window=self.window)
