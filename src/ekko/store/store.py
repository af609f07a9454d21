"""A node's tables: create them by spec, find them by name, snapshot and restore them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from ekko.store.errors import (
    SnapshotError,
    StoreError,
    TableConflictError,
    UnknownTableError,
)
from ekko.store.holding import Holding
from ekko.store.index import shard_of
from ekko.store.placement import Placement
from ekko.store.settled import Mark, SettledKnowledge
from ekko.store.snapshot import SnapshotData, SnapshotTable, read_snapshot, write_snapshot
from ekko.store.sources import History, SourceGroups, merge_shards
from ekko.store.spec import TableSpec
from ekko.store.table import Table
from ekko.store.table_records import DeleteHook, WriteHook

DEFAULT_RESERVE_BYTES = 4 << 20


def default_reserve(dim: int) -> int:
    """Rows ``Store.create_table`` reserves for a table of width ``dim`` created without a
    size: 1 024, fewer for a wide table (at most ``DEFAULT_RESERVE_BYTES`` of values), at
    least 16."""
    return max(16, min(1024, DEFAULT_RESERVE_BYTES // (4 * max(dim, 1))))


"""Values a table created without a size reserves room for, at most."""

_TABLE_ARRAYS = ("keys", "values", "versions", "wtimes", "lanes", "dead")


class Store:
    """Every table a node holds, plus the catalog version a puller checks to learn about new
    tables (DESIGN.md §2). Creating a table is idempotent for the same spec, so source and
    replicas can both create from a received catalog without coordinating."""

    def __init__(self, *, origin: int = 0, cache_capacity: int = 4096) -> None:
        self.origin = int(origin)
        self.cache_capacity = int(cache_capacity)
        self._tables: dict[str, Table] = {}
        self._catalog_version = 0
        # Which history of the source the rows belong to (``lineage``, 0: none yet; a source
        # that cannot prove it holds everything any replica holds starts a new one, and a
        # replica that meets another lineage upstream rebuilds from it: ``ekko.protocol.
        # puller``) and, a holder, the part of its knowledge that source's disk backs
        # (``settled``). One per source: a replica of several sources' partitions keeps one
        # per group of them (``set_sources``, ``ekko.store.sources``).
        self._history = History()
        self._sources: SourceGroups | None = None
        self._loaded_lineages: dict[int, int] = {}  # per partition, from a snapshot
        self.snapshot_wal_seq = 0  # the log position the snapshot this store came from covers
        self._on_write: WriteHook | None = None
        self._on_delete: DeleteHook | None = None
        # A source: its process's mark (epoch, log written, log on disk) for every answer.
        self.mark_source: Callable[[], Mark] | None = None
        # The shards and memory this store may hold (``ekko.store.holding``; None: any).
        self.holding: Holding | None = None

    # -- source histories (``ekko.store.sources``) --------------------------------------------

    def set_sources(self, placement: Placement, groups: Sequence[Iterable[int]]) -> None:
        """Hold the partitions in ``groups`` (one group per source) as separate histories:
        each with its own lineage (a snapshot's per partition, else its one lineage) and
        settled knowledge. One group (or none) keeps the store's single history."""
        if len(groups) < 2:
            self._sources = None
            return
        sources = SourceGroups(placement, groups)
        for g, h in zip(sources.groups, sources.histories, strict=True):
            seen = {self._loaded_lineages.get(p, self._history.lineage) for p in g}
            if len(seen) > 1:
                raise StoreError(
                    f"partitions {list(g)} share a source but their rows are of lineages "
                    f"{sorted(f'{x:x}' for x in seen)}: rebuild this store (start it empty)"
                )
            h.lineage = seen.pop()
        self._sources = sources

    @property
    def multi_source(self) -> bool:
        """Whether this store holds partitions of several sources (several histories)."""
        return self._sources is not None

    def history(self, partitions: Iterable[int] | None = None) -> History:
        """The history of ``partitions``' rows (None: the store's one history).
        ``StoreError`` when the store holds several sources' partitions and ``partitions``
        span them, or are None."""
        if self._sources is None:
            return self._history
        return self._sources.histories[self._sources.index(partitions)]

    @property
    def lineage(self) -> int:
        """The lineage of the rows (several sources' partitions: ``StoreError``; ask
        ``history(partitions)``)."""
        return self.history().lineage

    @lineage.setter
    def lineage(self, value: int) -> None:
        self.history().lineage = int(value)

    @property
    def settled(self) -> SettledKnowledge:
        """The knowledge the source's disk backs (several sources: ``history(partitions)``)."""
        return self.history().settled

    @settled.setter
    def settled(self, value: SettledKnowledge) -> None:
        self.history().settled = value

    def lineages(self) -> dict[int, int]:
        """Per held partition, the lineage of its rows (one source: {} — see ``lineage``)."""
        return {} if self._sources is None else self._sources.lineages()

    def lineage_key(self) -> tuple[int, ...]:
        """Every history's lineage: moves whenever any of them changes."""
        if self._sources is None:
            return (self._history.lineage,)
        return tuple(h.lineage for h in self._sources.histories)

    def settled_of(self, name: str) -> np.ndarray | None:
        """Table ``name``'s settled knowledge, each shard by its own source's history
        (zeros where nothing settled); None when nothing of it settled (one source)."""
        if self._sources is None:
            return self._history.settled.settled.get(name)
        table = self._tables.get(name)
        if table is None:
            return None
        out = np.zeros_like(table.knowledge)
        for i, h in enumerate(self._sources.histories):
            s = h.settled.settled.get(name)
            if s is not None and s.shape == out.shape:
                m = self._sources.mask(i, name, table.num_shards)
                out[m] = s[m]
        return out

    def _mask(self, partitions: Iterable[int] | None, table: Table) -> np.ndarray | None:
        """bool [shards]: the shards of ``partitions``' source (None: one source, all)."""
        if self._sources is None:
            return None
        i = self._sources.index(partitions)
        return self._sources.mask(i, table.name, table.num_shards)

    def holds_rows(self, partitions: Iterable[int] | None = None) -> bool:
        """Whether any live row of ``partitions``' source is held (None: of any)."""
        for t in self._tables.values():
            mask = self._mask(partitions, t)
            if mask is None:
                if t.rows:
                    return True
                continue
            keys, _, versions, _, _, dead = t.all_slots()
            live = (versions > 0) & (dead == 0)
            if (live & mask[shard_of(keys, t.num_shards)]).any():
                return True
        return False

    @property
    def tables(self) -> Mapping[str, Table]:
        """Read-only view of the tables by name."""
        return MappingProxyType(self._tables)

    @property
    def catalog_version(self) -> int:
        """Bumped once for every table created."""
        return self._catalog_version

    def create_table(self, spec: TableSpec, *, initial_rows: int | None = None) -> Table:
        """The table named ``spec.name``, created if absent, with room for ``initial_rows``
        (None: 1 024 rows, or fewer for a wide table — at most ``DEFAULT_RESERVE_BYTES`` of
        values: a replica learns its tables from a catalog, which says nothing of their
        sizes, and a 1-row dense table of 23 488 floats had reserved 92 MB). An existing
        table with another spec raises ``TableConflictError`` naming both specs."""
        if initial_rows is None:
            initial_rows = default_reserve(spec.dim)
        existing = self._tables.get(spec.name)
        if existing is not None:
            if existing.spec != spec:
                raise TableConflictError(
                    f"table {spec.name!r} exists as {existing.spec}, cannot create it as {spec}"
                )
            return existing
        if self.holding is not None:
            initial_rows = self.holding.initial_rows(spec, initial_rows)
            self.holding.admit_table(self._tables, spec, initial_rows)
        table = Table(
            spec,
            origin=self.origin,
            cache_capacity=self.cache_capacity,
            initial_rows=initial_rows,
        )
        table.on_write = self._on_write
        table.on_delete = self._on_delete
        table.admit = self._admit if self.holding is not None else None
        self._tables[spec.name] = table
        self._catalog_version += 1
        return table

    def set_write_hook(self, hook: WriteHook | None) -> None:
        """Call ``hook`` after every source write to any table (the write-ahead journal)."""
        self._on_write = hook
        for t in self._tables.values():
            t.on_write = hook

    def set_holding(self, holding: Holding | None) -> None:
        """Take rows only of ``holding``'s shards, within its budget, from now on: every
        table refuses (raises) a write, delete or apply of any other, storing nothing."""
        self.holding = holding
        for t in self._tables.values():
            t.admit = self._admit if holding is not None else None

    def _admit(self, table: Table, keys: np.ndarray) -> None:
        assert self.holding is not None
        self.holding.admit(self._tables, table, keys)

    def set_delete_hook(self, hook: DeleteHook | None) -> None:
        """Call ``hook`` after every source delete from any table (the write-ahead journal)."""
        self._on_delete = hook
        for t in self._tables.values():
            t.on_delete = hook

    def replace_with(self, other: Store, partitions: Iterable[int] | None = None) -> None:
        """Hold exactly ``other``'s tables and lineage from now on (a replica rebuilt from a
        new lineage). The catalog version moves past both, so pullers relearn the tables.

        Holding several sources' partitions, only the shards of ``partitions``' source are
        taken from ``other`` (a store of that one source's rows); every other shard keeps
        its rows, versions and knowledge (``merge_shards``)."""
        history = self.history(partitions)
        if self._sources is None:
            self._tables = dict(other._tables)
        else:
            for name in {**self._tables, **other._tables}:
                old, new = self._tables.get(name), other._tables.get(name)
                like = new if new is not None else old
                assert like is not None
                mask = self._sources.mask(
                    self._sources.index(partitions), like.name, like.num_shards
                )
                self._tables[name] = merge_shards(old, new, mask)
        for t in self._tables.values():
            t.on_write = self._on_write
            t.on_delete = self._on_delete
            t.admit = self._admit if self.holding is not None else None
        self._catalog_version = max(self._catalog_version, other._catalog_version) + 1
        history.lineage = other.lineage
        history.settled = other.settled

    def mark(self, partitions: Iterable[int] | None = None) -> Mark | None:
        """What an answer from this store carries: a source's own mark, a relay's newest
        from upstream of ``partitions``' source (None: neither, and a holder settles
        nothing on it)."""
        if self.mark_source is not None:
            return self.mark_source()
        return self.history(partitions).settled.last()

    def knowledge_by_table(self) -> dict[str, np.ndarray]:
        return {name: t.knowledge for name, t in self._tables.items()}

    def settle_back(self, mark: Mark, partitions: Iterable[int] | None = None) -> None:
        """The upstream of ``partitions`` answers from another source process: knowledge
        of that source's shards back to the part the old one's disk backed
        (``SettledKnowledge``); the rest is pulled again. Other sources' shards keep theirs."""
        before = {name: t.knowledge.copy() for name, t in self._tables.items()}
        history = self.history(partitions)
        if self._sources is None:
            history.settled.settle_back(mark, self.knowledge_by_table())
        else:
            work = {name: k.copy() for name, k in before.items()}
            history.settled.settle_back(mark, work)
            for name, t in self._tables.items():
                mask = self._mask(partitions, t)
                t.knowledge[mask] = work[name][mask]
        for name, t in self._tables.items():
            t.shard_version[(t.knowledge != before[name]).any(axis=1)] += 1

    def table(self, name: str) -> Table:
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(name) from None

    def specs(self) -> list[TableSpec]:
        return [t.spec for t in self._tables.values()]

    def digests(self) -> dict[str, int]:
        """Content hash per table; equal on two nodes iff they hold the same rows."""
        return {name: t.digest() for name, t in self._tables.items()}

    # -- snapshots ---------------------------------------------------------------------------

    def save(self, path: Path, *, wal_seq: int = 0) -> None:
        """Write every table's rows and sync counters to ``path`` atomically; ``wal_seq`` is
        the last write-ahead log record the rows include."""
        write_snapshot(Path(path), self.snapshot_data(wal_seq=wal_seq))

    def snapshot_data(self, *, wal_seq: int = 0) -> SnapshotData:
        """What ``save`` writes: every table's rows and sync counters (views, not copies)."""
        tables = []
        for t in self._tables.values():
            rows = dict(zip(_TABLE_ARRAYS, t.all_slots(), strict=True))
            rows.update(
                counter=t.counter,
                knowledge=t.knowledge,
                shard_version=t.shard_version,
                purge_bar=t.purge_bar,
            )
            tables.append(SnapshotTable(t.name, t.dim, t.num_shards, rows))
        lineages = self.lineages()
        # One lineage for readers from before several sources: the first source's.
        first = self._history.lineage if not lineages else next(iter(lineages.values()))
        return SnapshotData(self.origin, self._catalog_version, tables, first, wal_seq, lineages)

    def copy(self) -> Store:
        """An independent store holding what a snapshot of this one taken now would restore
        (update caches empty): a node's disk as it was at this moment."""
        out = Store.from_snapshot_data(self.snapshot_data(), cache_capacity=self.cache_capacity)
        out._history = self._history.copy()
        out._sources = None if self._sources is None else self._sources.copy()
        return out

    @classmethod
    def load(cls, path: Path, *, cache_capacity: int = 4096) -> Store:
        """A store restored from ``path``: same rows, versions, counters and knowledge. The
        update caches start empty (dominator = counter), so old cursors take a full scan."""
        data = read_snapshot(Path(path))
        try:
            return cls.from_snapshot_data(data, cache_capacity=cache_capacity)
        except (StoreError, KeyError) as exc:
            raise SnapshotError(f"cannot load snapshot {path}: {exc}") from exc

    @classmethod
    def from_snapshot_data(cls, data: SnapshotData, *, cache_capacity: int = 4096) -> Store:
        """A store holding ``data`` (copied in); ``StoreError`` or ``KeyError`` when its
        arrays do not make a table."""
        store = cls(origin=data.origin, cache_capacity=cache_capacity)
        for st in data.tables:
            a = st.arrays
            spec = TableSpec(st.name, st.dim, st.num_shards)
            n = int(a["keys"].shape[0])
            table = store.create_table(spec, initial_rows=max(n, 1024))
            table.restore_rows(
                a["keys"],
                a["values"],
                a["versions"],
                a["wtimes"],
                a["lanes"],
                counter=a["counter"],
                knowledge=a["knowledge"],
                shard_version=a["shard_version"],
                dead=a.get("dead"),  # a snapshot from before deletes holds none
                purge_bar=a.get("purge_bar"),  # nor one from before purges
            )
        store._catalog_version = data.catalog_version
        store._history.lineage = data.lineage
        store._loaded_lineages = dict(data.lineages)  # taken up by ``set_sources``
        store.snapshot_wal_seq = data.wal_seq
        return store
