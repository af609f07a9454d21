"""The source histories one store holds: a lineage and settled knowledge per source (issue 17).

Why per source and not per store: in a partitioned cluster each partition has its own source
process in the training DC, and a replica may hold partitions of several of them. Each source
has its own history (``lineage``: restarted without its data it draws a new one and its
replicas rebuild) and its own process marks (``settled``: a restart takes holders' knowledge
back to what its disk backed). Kept per store, one source's restart would rebuild, or take
back, the rows of every other source the replica holds; the marks of two live sources would
even look like a restart on every answer. So a store holding partitions of several sources
keeps one ``History`` per group of partitions of one source, and every rule that read "the
store's lineage" reads the lineage of the partitions in question (``Store.history``).

A store of one source (every source, and every replica of one source) keeps one history and
no groups: nothing changes for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from ekko.store import _table_kernels as K
from ekko.store.errors import StoreError, TableConflictError
from ekko.store.index import shard_of
from ekko.store.placement import Placement
from ekko.store.settled import SettledKnowledge
from ekko.store.table import Table


class History:
    """One source's history as a store holds it: the lineage its rows belong to (0: none
    yet) and the part of the store's knowledge of its shards that source's disk backs."""

    def __init__(self, lineage: int = 0) -> None:
        self.lineage = int(lineage)
        self.settled = SettledKnowledge()

    def copy(self) -> History:
        out = History(self.lineage)
        out.settled = self.settled.copy()
        return out


class SourceGroups:
    """The partitions of each source a store holds, under ``placement``, each group with its
    ``History``; answers which group a set of partitions belongs to and which shards of a
    table a group holds.

    Raises ``StoreError`` for an empty group, a repeated partition, or one the placement
    lacks."""

    def __init__(self, placement: Placement, groups: Sequence[Iterable[int]]) -> None:
        self.placement = placement
        self.groups = tuple(tuple(sorted(set(g))) for g in groups)
        self._of: dict[int, int] = {}
        for i, g in enumerate(self.groups):
            if not g:
                raise StoreError(f"source groups {list(self.groups)}: group {i} is empty")
            for p in g:
                if not 0 <= p < placement.partitions:
                    raise StoreError(
                        f"source groups {list(self.groups)}: partition {p} is not in "
                        f"[0, {placement.partitions})"
                    )
                if p in self._of:
                    raise StoreError(
                        f"source groups {list(self.groups)}: partition {p} is in two groups"
                    )
                self._of[p] = i
        self.histories = [History() for _ in self.groups]
        self._masks: dict[tuple[int, str, int], np.ndarray] = {}

    def copy(self) -> SourceGroups:
        out = SourceGroups(self.placement, self.groups)
        out.histories = [h.copy() for h in self.histories]
        return out

    def index(self, partitions: Iterable[int] | None) -> int:
        """The group holding every one of ``partitions``; ``StoreError`` naming them when
        they span sources, are not held, or are None (every shard: several sources)."""
        parts = None if partitions is None else sorted(set(partitions))
        if not parts:
            raise StoreError(
                f"this store holds partitions of {len(self.groups)} sources "
                f"{[list(g) for g in self.groups]}: name the partitions of one"
            )
        found = {self._of.get(p, -1) for p in parts}
        if -1 in found:
            missing = [p for p in parts if p not in self._of]
            raise StoreError(f"partitions {parts}: {missing} not held by this store")
        if len(found) > 1:
            raise StoreError(
                f"partitions {parts} come from {len(found)} sources (groups "
                f"{[list(self.groups[i]) for i in sorted(found)]}); a link pulls one source's"
            )
        return found.pop()

    def mask(self, i: int, table: str, num_shards: int) -> np.ndarray:
        """bool [num_shards]: the shards of ``table`` in group ``i``'s partitions."""
        key = (i, table, num_shards)
        m = self._masks.get(key)
        if m is None:
            parts = self.placement.partitions_of(table, num_shards)
            m = self._masks[key] = np.isin(parts, self.groups[i])
        return m

    def lineages(self) -> dict[int, int]:
        """Per partition, the lineage of its rows."""
        return {p: self.histories[i].lineage for p, i in sorted(self._of.items())}


def merge_shards(old: Table | None, new: Table | None, mask: np.ndarray) -> Table:
    """A table holding ``old``'s rows and sync state outside ``mask`` (bool [shards]) and
    ``new``'s inside it: one source's shards rebuilt from its new lineage, the others'
    untouched (rows, versions, knowledge and shard versions). The rebuilt shards' shard
    versions move past both, and the update cache starts empty, so every cursor takes the
    full scan once. Hooks are left to the caller."""
    like = new if new is not None else old
    assert like is not None
    if old is not None and new is not None and old.spec != new.spec:
        raise TableConflictError(
            f"table {old.name!r} is {old.spec} here and {new.spec} in the rebuilt lineage"
        )
    spec, ns = like.spec, like.num_shards
    columns: list[list[np.ndarray]] = []
    for t, keep in ((old, ~mask), (new, mask)):
        if t is None:
            continue
        cols = t.all_slots()
        sel = keep[shard_of(cols[0], ns)]
        columns.append([c[sel] for c in cols])
    keys, values, versions, wtimes, lanes, dead = (
        np.concatenate([c[i] for c in columns]) for i in range(6)
    )

    def pick(name: str) -> np.ndarray:
        a = getattr(old, name) if old is not None else np.zeros_like(getattr(like, name))
        b = getattr(new, name) if new is not None else np.zeros_like(getattr(like, name))
        m = mask if a.ndim == 1 else mask[:, None]
        return np.where(m, b, a)

    shard_version = pick("shard_version")
    if old is not None and new is not None:
        top = np.maximum(old.shard_version, new.shard_version) + 1
        shard_version = np.where(mask, top, old.shard_version)
    elif old is not None:
        shard_version = np.where(mask, old.shard_version + 1, old.shard_version)
    out = Table(
        spec,
        origin=like.origin,
        cache_capacity=like.cache_capacity,
        initial_rows=max(int(keys.shape[0]), 1024),
    )
    out.restore_rows(
        keys,
        values,
        versions,
        wtimes,
        lanes,
        counter=pick("counter"),
        knowledge=pick("knowledge"),
        shard_version=shard_version,
        dead=dead,
        purge_bar=pick("purge_bar"),
    )
    if old is not None:
        out.max_abs = old.max_abs
        # Sessions compare these with what they last saw: an epoch back at 0 would read as
        # rows dropped by a reconcile here, and owe every holder below a key list again.
        out.reconcile_epoch[:] = old.reconcile_epoch
        out.purge_epoch = old.purge_epoch
    return out


def shards_digest(table: Table, mask: np.ndarray) -> int:
    """``Table.digest`` of the rows of the shards in ``mask`` (bool [shards]) only: equal on
    two nodes iff they hold the same rows there (a partition's, whoever else they hold)."""
    keys, values, versions, _, _, dead = table.all_slots()
    sel = mask[shard_of(keys, table.num_shards)]
    words = np.ascontiguousarray(values[sel]).view(np.uint32)
    return int(K.digest_rows(keys[sel], versions[sel], words, dead[sel]))
