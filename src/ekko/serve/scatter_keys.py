"""Which partition holds each key of a lookup, and one table's rows put back together from
its partitions' answers.

Pure array work over the cluster's ``Placement`` (no holders, no time): a scatter splits
every table's keys by partition with ``PartitionKeys.split_all`` and merges the answers with
``merge_all``, in the keys' order. Both work on all the tables at once: a predict batch asks
26 tables of about 8 keys per partition, and array calls per table and partition were most
of a serving node's CPU per batch beyond one partition's (``split`` and ``merge_rows`` are
the one-table forms).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

from ekko.client.wire import TableRows
from ekko.serve.errors import ModelNotReady
from ekko.store import TableShardGroups, shard_of
from ekko.store.placement import Placement

MAX_TABLE_SETS = 64
"""Sets of tables whose grouping ``PartitionKeys`` keeps (a model's tables are one set)."""

Where = list[tuple[int, np.ndarray | None]]
"""(partition, positions of its keys in a table's keys; None: all of them), per partition."""


class Split(NamedTuple):
    """Every table of a scatter split by partition (``PartitionKeys.split_all``): each
    table's ``Where`` and keys per partition of it; ``order``, int64 [keys of all tables],
    the positions of its ``Where``, table after table, each table's from ``starts[t]`` (int64
    [tables + 1]); both None when one partition holds everything."""

    where: dict[str, Where]
    subs: dict[str, list[np.ndarray]]
    order: np.ndarray | None
    starts: np.ndarray | None


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

    def split_all(self, tables: Mapping[str, np.ndarray]) -> Split:
        """Each table's ``Where`` (int64 keys [n] each; the partitions holding some of them,
        in partition order, with the positions of their keys, None when one holds them all)
        and its keys of each of those partitions (the table's own array when one holds them
        all), every table in one kernel call."""
        if self.placement.partitions == 1 or not tables:
            where = {t: [(0, None)] for t in tables}
            return Split(where, {t: [k] for t, k in tables.items()}, None, None)
        names = list(tables)
        arrays = list(tables.values())
        shards = tuple((t, self.num_shards(t)) for t in names)
        groups = self._groups_of.get(shards)
        if groups is None:
            if len(self._groups_of) >= MAX_TABLE_SETS:  # table sets seen lately, bounded
                self._groups_of.clear()
            groups = self._groups_of[shards] = TableShardGroups(
                [self._shard_parts(t)[1] for t in names], self.placement.partitions
            )
        starts = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([k.shape[0] for k in arrays], out=starts[1:])
        order, grouped, counts = groups.group(np.concatenate(arrays), starts)
        where: dict[str, Where] = {}
        subs: dict[str, list[np.ndarray]] = {}
        for name, k, at, row in zip(names, arrays, starts.tolist(), counts.tolist(), strict=False):
            held = [(p, c) for p, c in enumerate(row) if c]
            if len(held) == 1:
                where[name], subs[name] = [(held[0][0], None)], [k]
                continue
            w, sub = where[name], subs[name] = [], []
            for p, c in held:
                w.append((p, order[at : at + c]))
                sub.append(grouped[at : at + c])
                at += c
        return Split(where, subs, order, starts)


def merge_rows(
    table: str,
    keys: np.ndarray,
    known: np.ndarray | None,
    where: Where,
    answers: Mapping[int, Mapping[str, TableRows]],
) -> TableRows:
    """One table's ``TableRows`` over all its keys from the partitions' answers."""
    if len(where) == 1 and where[0][1] is None:
        return answers[where[0][0]][table]
    n = keys.shape[0]
    dims = {answers[p][table].values.shape[1] for p, _ in where}
    if len(dims) > 1:
        raise ModelNotReady(f"table {table!r}: its partitions answer rows of dims {sorted(dims)}")
    dim = dims.pop()
    versions = np.empty(n, dtype=np.int64)
    found = np.empty(n, dtype=np.uint8)
    for p, idx in where:
        rows = answers[p][table]
        versions[idx] = rows.versions
        found[idx] = rows.found
    if known is None:  # every row came with its values
        values = np.empty((n, dim), dtype=np.float32)
        for p, idx in where:
            values[idx] = answers[p][table].values
        return TableRows(table, versions, found, values)
    changed = versions != known
    rank = np.cumsum(changed) - 1
    values = np.empty((int(rank[-1]) + 1 if n else 0, dim), dtype=np.float32)
    for p, idx in where:
        rows = answers[p][table]
        values[rank[idx[changed[idx]]]] = rows.values
    return TableRows(table, versions, found, values)


def merge_all(
    split: Split,
    tables: Mapping[str, np.ndarray],
    known: Mapping[str, np.ndarray],
    answers: Mapping[int, Mapping[str, TableRows]],
) -> dict[str, TableRows]:
    """``merge_rows`` of every table of ``split``, in the order of ``tables``. The tables
    asked without known versions whose keys several partitions hold (an embedding table of a
    predict batch, typically) are merged together, a few array operations per row length,
    where one table at a time cost three per table and partition."""
    out: dict[str, TableRows] = {}
    flat: dict[int, list[int]] = {}  # row length -> positions (in ``tables``) merged at once
    for i, (table, keys) in enumerate(tables.items()):
        where = split.where[table]
        v = known.get(table)
        if v is not None or where[0][1] is None:
            out[table] = merge_rows(table, keys, v, where, answers)
            continue
        # grouped by the first partition's row length; another's that differs fails the
        # group's concatenation, and the table is merged alone to say so
        flat.setdefault(answers[where[0][0]][table].values.shape[1], []).append(i)
    if flat:
        names = list(tables)
        for dim, chosen in flat.items():
            mine = [names[i] for i in chosen]
            try:
                out.update(_merge_together(split, mine, chosen, dim, answers))
            except ValueError:
                for t in mine:
                    out[t] = merge_rows(t, tables[t], None, split.where[t], answers)
    return {t: out[t] for t in tables}


def _merge_together(
    split: Split,
    names: list[str],
    chosen: list[int],
    dim: int,
    answers: Mapping[int, Mapping[str, TableRows]],
) -> dict[str, TableRows]:
    """Tables ``names`` (at positions ``chosen`` of the split, rows of ``dim``) merged into
    one array each of versions, found flags and values, each table's rows a slice of them."""
    assert split.order is not None and split.starts is not None
    starts = split.starts
    sizes = np.diff(starts)
    pick = np.zeros(sizes.shape[0], dtype=bool)
    pick[chosen] = True
    mine = sizes[pick]
    begins = np.zeros(mine.shape[0] + 1, dtype=np.int64)
    np.cumsum(mine, out=begins[1:])
    # where each answered row goes: its position in its table plus its table's start
    dest = split.order[np.repeat(pick, sizes)] + np.repeat(begins[:-1], mine)
    rows = [answers[p][t] for t in names for p, _ in split.where[t]]
    n = int(begins[-1])
    versions = np.empty(n, dtype=np.int64)
    versions[dest] = np.concatenate([r.versions for r in rows])
    found = np.empty(n, dtype=np.uint8)
    found[dest] = np.concatenate([r.found for r in rows])
    values = np.empty((n, dim), dtype=np.float32)
    values[dest] = np.concatenate([r.values for r in rows])
    out = {}
    for t, a, b in zip(names, begins[:-1].tolist(), begins[1:].tolist(), strict=True):
        out[t] = TableRows(t, versions[a:b], found[a:b], values[a:b])
    return out
