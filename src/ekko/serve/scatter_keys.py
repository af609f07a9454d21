"""Which partition holds each key of a lookup: a scatter's keys split into one ``FlatAsk``
per partition, and the partitions' ``FlatRows`` put back together as each table's rows.

Pure array work over the cluster's ``Placement`` (no holders, no time), one kernel call each
way for all the tables at once: a predict batch asks 26 tables of about 8 keys per
partition, and array calls and Python objects per table and partition (a ``TableRows`` to
check, slice and merge again) were most of a serving node's CPU per batch beyond one
partition's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
from numba import njit

from ekko.client.wire import TableRows
from ekko.serve.errors import ModelNotReady
from ekko.serve.scatter_fetch import NO_KNOWN, FlatAsk, FlatRows
from ekko.store import TableShardGroups, shard_of
from ekko.store.placement import Placement

MAX_TABLE_SETS = 64
"""Sets of tables whose grouping ``PartitionKeys`` keeps (a model's tables are one set)."""

NO_ORDER = np.zeros(0, np.int64)


class Split(NamedTuple):
    """A scatter's tables split by partition (``PartitionKeys.split``): the tables' names,
    where each table's keys start in their concatenation (int64 [tables + 1]), each
    partition's count of keys of each table (int64 [partitions, tables]), the position in
    the concatenation of each key asked, partition after partition (int64 [n]; empty: the
    keys' own order) and the ``FlatAsk`` of each partition asked, in partition order."""

    names: list[str]
    starts: np.ndarray
    counts: np.ndarray
    order: np.ndarray
    known: np.ndarray | None
    asks: dict[int, FlatAsk]


class PartitionKeys:
    """Maps a table's keys to the partitions holding them.

    Why an object: each table's shard -> partition array is computed once per shard count
    and reused by every scatter.

    Args:
        placement: which partition holds each (table, shard).
        num_shards: a table's shard count (the node's catalog, or the holders' listing),
            read at every split (a table's count may become known later).
    """

    def __init__(self, placement: Placement, num_shards: Callable[[str], int]) -> None:
        self.placement = placement
        self.num_shards = num_shards
        self._shard_parts_of: dict[tuple[str, int], np.ndarray] = {}  # each shard's partition
        self._groups_of: dict[tuple[tuple[str, int], ...], TableShardGroups] = {}

    def _shard_parts(self, table: str) -> tuple[int, np.ndarray]:
        """The table's shard count and each shard's partition."""
        n = self.num_shards(table)
        of = self._shard_parts_of.get((table, n))
        if of is None:
            of = self._shard_parts_of[table, n] = self.placement.partitions_of(table, n)
        return n, of

    def partition_of_keys(self, table: str, keys: np.ndarray) -> np.ndarray:
        """int64 [n]: the partition holding each key of ``table``."""
        if self.placement.partitions == 1:
            return np.zeros(keys.shape[0], dtype=np.int64)
        n, of = self._shard_parts(table)
        return of[shard_of(keys, n)]

    def split(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray] | None = None
    ) -> Split:
        """``tables`` (int64 keys [n >= 1] each) and their ``known`` versions (int64 [n] of
        some tables; -1 where a table has none) as one ``FlatAsk`` per partition holding
        some of the keys, each with its keys of every table, every table in one kernel
        call."""
        names = list(tables)
        arrays = list(tables.values())
        sizes = np.fromiter((k.shape[0] for k in arrays), np.int64, len(arrays))
        starts = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum(sizes, out=starts[1:])
        keys = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        flat_known = None
        if known:
            flat_known = np.full(keys.shape[0], -1, np.int64)
            for name, a, b in zip(names, starts[:-1].tolist(), starts[1:].tolist(), strict=True):
                v = known.get(name)
                if v is not None:
                    flat_known[a:b] = v
        if self.placement.partitions == 1:
            ask = FlatAsk(names, sizes, keys, flat_known)
            return Split(names, starts, sizes[None, :], NO_ORDER, flat_known, {0: ask})
        shards = tuple((t, self.num_shards(t)) for t in names)
        groups = self._groups_of.get(shards)
        if groups is None:
            if len(self._groups_of) >= MAX_TABLE_SETS:  # table sets seen lately, bounded
                self._groups_of.clear()
            groups = self._groups_of[shards] = TableShardGroups(
                [self._shard_parts(t)[1] for t in names], self.placement.partitions
            )
        order, grouped, counts = groups.group_parts(keys, starts)
        held = flat_known[order] if flat_known is not None else None
        totals = counts.sum(axis=1).tolist()
        every = (counts > 0).all(axis=1).tolist()
        asks: dict[int, FlatAsk] = {}
        at = 0
        for p, (n, full) in enumerate(zip(totals, every, strict=True)):
            if not n:
                continue
            row = counts[p]
            if full:
                mine, c = names, row
            else:
                some = np.flatnonzero(row)
                mine, c = [names[t] for t in some.tolist()], row[some]
            sub = None if held is None else held[at : at + n]
            asks[p] = FlatAsk(mine, c, grouped[at : at + n], sub)
            at += n
        return Split(names, starts, counts, order, flat_known, asks)

    def held_by(self, tables: Mapping[str, np.ndarray]) -> dict[int, list[str]]:
        """The partitions holding some of ``tables``' keys, each with the tables it holds
        keys of, in partition order."""
        if not tables:
            return {}
        split = self.split(tables)
        return {p: ask.names for p, ask in split.asks.items()}


@njit(cache=True, nogil=True)
def _merge_kernel(
    counts: np.ndarray,
    order: np.ndarray,
    starts: np.ndarray,
    known: np.ndarray,
    dims: np.ndarray,
    versions: np.ndarray,
    values: np.ndarray,
    out_versions: np.ndarray,
    out_found: np.ndarray,
    out_dims: np.ndarray,
    out_rows: np.ndarray,
    out_offsets: np.ndarray,
) -> tuple[np.int64, np.ndarray]:
    """Every partition's answer (``dims``, ``versions`` and ``values`` of the partitions
    asked, concatenated in partition order; answers checked) scattered into the tables'
    rows in their keys' order: returns (-1, values), or (t, empty) when table t's
    partitions answer rows of different lengths."""
    parts, tables = counts.shape
    out_dims[:] = -1
    k = 0
    for p in range(parts):
        for t in range(tables):
            if counts[p, t]:
                d = dims[k]
                if out_dims[t] < 0:
                    out_dims[t] = d
                elif out_dims[t] != d:
                    return np.int64(t), np.zeros(0, np.float32)
                k += 1
    same = order.shape[0] == 0
    for j in range(versions.shape[0]):
        i = j if same else order[j]
        out_versions[i] = versions[j]
        out_found[i] = 1 if versions[j] > 0 else 0
    check = known.shape[0] > 0
    rank = np.empty(versions.shape[0], np.int64)  # a key's row of values in its table's
    out_offsets[0] = 0
    for t in range(tables):
        m = 0
        for i in range(starts[t], starts[t + 1]):
            if check and out_versions[i] == known[i]:
                rank[i] = -1
            else:
                rank[i] = m
                m += 1
        out_rows[t] = m
        out_offsets[t + 1] = out_offsets[t] + m * out_dims[t]
    out = np.empty(out_offsets[tables], np.float32)
    j = 0
    v = 0
    for p in range(parts):
        for t in range(tables):
            d = out_dims[t]
            for _ in range(counts[p, t]):
                i = j if same else order[j]
                r = rank[i]
                if r >= 0:
                    at = out_offsets[t] + r * d
                    for x in range(d):
                        out[at + x] = values[v + x]
                    v += d
                j += 1
    if v != values.shape[0]:  # the answers were checked: a bug
        return np.int64(tables), out
    return np.int64(-1), out


def merge(split: Split, answers: Mapping[int, FlatRows]) -> dict[str, TableRows]:
    """Each table's ``TableRows`` over all its keys, in their order, from the checked
    answers of every partition of ``split``; ``ModelNotReady`` naming a table whose
    partitions answer rows of different lengths."""
    got = [answers[p] for p in split.asks]
    if len(got) == 1:
        dims, _, versions, values = got[0]
    else:
        dims = np.concatenate([a.dims for a in got])
        versions = np.concatenate([a.versions for a in got])
        values = np.concatenate([a.values for a in got])
    tables = len(split.names)
    n = versions.shape[0]
    out_versions = np.empty(n, np.int64)
    out_found = np.empty(n, np.uint8)
    out_dims = np.empty(tables, np.int64)
    out_rows = np.empty(tables, np.int64)
    offsets = np.empty(tables + 1, np.int64)
    known = NO_KNOWN if split.known is None else split.known
    bad, out = _merge_kernel(
        split.counts, split.order, split.starts, known, dims, versions, values,
        out_versions, out_found, out_dims, out_rows, offsets,
    )  # fmt: skip
    if bad >= 0:
        if bad == tables:
            raise AssertionError("checked answers whose values do not fill the tables' rows")
        name = split.names[bad]
        seen = sorted({int(a.dims[a_names.index(name)]) for a, a_names in
                       ((answers[p], ask.names) for p, ask in split.asks.items())
                       if name in a_names})  # fmt: skip
        raise ModelNotReady(f"table {name!r}: its partitions answer rows of dims {seen}")
    result = {}
    bounds = split.starts.tolist()
    offs = offsets.tolist()
    for t, (name, dim, rows) in enumerate(
        zip(split.names, out_dims.tolist(), out_rows.tolist(), strict=True)
    ):
        a, b = bounds[t], bounds[t + 1]
        result[name] = TableRows(
            name, out_versions[a:b], out_found[a:b], out[offs[t] : offs[t + 1]].reshape(rows, dim)
        )
    return result
