"""A lookup of several tables at once, answered into one buffer: a holder's lookup frame.

Apart from ``table`` because it is the serving path of a partition holder (a lookup stream's
frame names up to every table of a model, a few keys each), where ``Table.lookup`` per table
cost a validation, three allocations, two kernel calls, a filter and a copy each: a frame
of 26 tables x 8 keys took 135 us of a holder's CPU, on every holder a predict asks. Here
the whole frame is one kernel call that probes each table's index, gathers the rows the
caller does not hold already and writes them where the answer wants them; the frame's keys
are checked once. One call per table still cost 37 us for that frame, most of it numba's
dispatch of 12 arguments 26 times; one call over the tables' arrays kept in typed lists
(``_arrays``) costs 10 us (``/tmp/s16/mb/lk.py``, best of 5 runs of 2 000).

A holder answers a frame through its ``FramePlan`` (the frame's tables resolved once, the
answer checked and written whole in the kernel, 18 us for that frame, ``/tmp/s17/hold_mb.py``);
``lookup_tables`` is the same lookup for a caller with the keys in arrays (a serving node
reading the partitions it holds itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import njit, typed, types

from ekko.store import layout
from ekko.store._native import shard_of_key
from ekko.store._validate import check_keys
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, probe_slot
from ekko.store.row_arrays import RowArrays

if TYPE_CHECKING:
    from ekko.store.holding import Holding
    from ekko.store.store import Store
    from ekko.store.table import Table

_BUCKETS = types.int64[::1]
_VALUES = types.float32[:, ::1]
_VERSIONS = types.int64[::1]
_DEAD = types.uint8[::1]


@njit(cache=True, nogil=True)
def lookup_into(
    buckets: typed.List,
    masks: np.ndarray,
    keys: np.ndarray,
    starts: np.ndarray,
    known: np.ndarray,
    t_values: typed.List,
    t_ver: typed.List,
    t_dead: typed.List,
    dims: np.ndarray,
    out_ver: np.ndarray,
    rows: np.ndarray,
    out_values: np.ndarray,
) -> int:
    """Table ``t``'s keys ``keys[starts[t]:starts[t + 1]]`` looked up in its arrays
    (``buckets[t]``, ``masks[t]``, ``t_values[t]``, ...), written to ``out_ver`` (each key's
    version, 0: missing or a tombstone), ``rows`` (each table's count of rows with values)
    and ``out_values`` (the values of each row whose version is not ``known[i]``, all rows
    if ``known`` is empty; a missing row's values are zeros, table after table). Returns the
    floats written; ``out_values`` has room for every key's row."""
    check = known.shape[0] > 0
    at = 0
    for t in range(dims.shape[0]):
        bucket, mask, values, ver_of, dead = buckets[t], masks[t], t_values[t], t_ver[t], t_dead[t]
        dim = dims[t]
        first = at
        for i in range(starts[t], starts[t + 1]):
            slot = probe_slot(bucket, mask, keys[i])
            live = slot >= 0 and not dead[slot]
            ver = ver_of[slot] if live else np.int64(0)
            out_ver[i] = ver
            if check and known[i] == ver:
                continue
            if live:
                for j in range(dim):
                    out_values[at + j] = values[slot, j]
            else:
                for j in range(dim):
                    out_values[at + j] = 0.0
            at += dim
        rows[t] = (at - first) // dim if dim else 0
    return at


class _Arrays(NamedTuple):
    """The arrays of a set of tables as ``lookup_into`` takes them."""

    buckets: typed.List
    masks: np.ndarray
    values: typed.List
    versions: typed.List
    dead: typed.List
    dims: np.ndarray


MAX_KEPT = 64
"""Sets of tables whose arrays are kept between lookups (a model's tables are one set)."""


def _arrays(tables: Sequence[Table]) -> _Arrays:
    """The tables' arrays in typed lists, kept (``ekko.store.layout.kept``) until some
    table's arrays are replaced: building them costs a frame of 26 tables ~170 us, a lookup
    through them ~10 us."""
    kept = layout.kept
    if len(kept) >= MAX_KEPT:
        kept.clear()
    key = tuple(map(id, tables))
    got = kept.get(key)
    if got is None:
        buckets, values = typed.List.empty_list(_BUCKETS), typed.List.empty_list(_VALUES)
        versions, dead = typed.List.empty_list(_VERSIONS), typed.List.empty_list(_DEAD)
        masks = np.empty(len(tables), np.uint64)
        for t, table in enumerate(tables):
            ix: KeyIndex = table._index
            r: RowArrays = table._rows
            bucket, masks[t] = ix.probe_args()
            buckets.append(bucket)
            values.append(r.values)
            versions.append(r.versions)
            dead.append(r.dead)
        dims = np.array([table.dim for table in tables], np.int64)
        got = kept[key] = _Arrays(buckets, masks, values, versions, dead, dims)
    return got


@dataclass(frozen=True)
class FrameRows:
    """A lookup of several tables: each key's version (int64 [n], 0 where missing), each
    table's count of rows with values (int64 [tables]) and those rows' values, table after
    table, row after row (float32 [sum of rows x dim])."""

    versions: np.ndarray
    rows: np.ndarray
    values: np.ndarray


def lookup_tables(
    tables: Sequence[Table], keys: np.ndarray, starts: np.ndarray, known: np.ndarray | None
) -> FrameRows:
    """``Table.lookup`` of table ``t``'s keys ``keys[starts[t]:starts[t + 1]]`` for every
    table, the values of a key whose version equals ``known`` (int64 [n], if given) left
    out, as a lookup stream answers them. ``BadRowsError`` for keys, starts or known of the
    wrong type or shape."""
    k = check_keys(keys)
    n = k.shape[0]
    st = np.asarray(starts)
    if (
        st.dtype != np.int64
        or st.shape != (len(tables) + 1,)
        or st[0] != 0
        or st[-1] != n
        or (st[1:] < st[:-1]).any()
    ):
        raise BadRowsError(
            f"starts must be int64 [{len(tables) + 1}] rising from 0 to {n} keys, got "
            f"{st.dtype} {st.tolist()[:8]}"
        )
    if known is None:
        kn = np.zeros(0, np.int64)
    else:
        kn = check_keys(known)
        if kn.shape[0] != n:
            raise BadRowsError(f"known: {kn.shape[0]} versions for {n} keys")
    a = _arrays(tables)
    versions = np.empty(n, np.int64)
    rows = np.empty(len(tables), np.int64)
    values = np.empty(int((np.diff(st) * a.dims).sum()), np.float32)
    at = lookup_into(
        a.buckets, a.masks, k, st, kn, a.values, a.versions, a.dead, a.dims, versions, rows,
        values,
    )  # fmt: skip
    return FrameRows(versions, rows, values[:at])


FRAME_OK, FRAME_BAD_COUNTS, FRAME_TOO_BIG, FRAME_NOT_HELD = range(4)
"""What ``FramePlan.answer`` found: the answer written, or why not."""


@njit(cache=True, nogil=True)
def _answer_frame(
    buckets: typed.List,
    masks: np.ndarray,
    t_values: typed.List,
    t_ver: typed.List,
    t_dead: typed.List,
    dims: np.ndarray,
    num_shards: np.ndarray,
    elsewhere: np.ndarray,
    shard_at: np.ndarray,
    body: np.ndarray,
    n: int,
    with_known: bool,
    head: int,
    max_answer: int,
) -> tuple[np.ndarray, int, int]:
    """A lookup frame's body (uint8: each table's count of keys, the keys, then if
    ``with_known`` each key's known version) answered into one buffer after ``head`` bytes
    left for the caller: the tables' dims, their counts of rows with values, each key's
    version, the values (``lookup_into``). Returns (buffer, status, detail): ``FRAME_OK``
    and the bytes written; ``FRAME_BAD_COUNTS`` and the first table whose count is not
    1..the keys left (the count of tables if they sum to less than n); ``FRAME_TOO_BIG`` and
    the bytes the keys could answer (over ``max_answer``); ``FRAME_NOT_HELD`` and the first
    table with a key of a shard flagged in ``elsewhere`` (table t's shard s at
    ``shard_at[t] + s``)."""
    tables = dims.shape[0]
    none = np.empty(0, np.uint8)
    counts = body[: 8 * tables].view(np.int64)
    starts = np.empty(tables + 1, np.int64)
    starts[0] = 0
    need = 0
    floats = 0
    for t in range(tables):
        c = counts[t]
        if c < 1 or c > n - starts[t]:  # so the sum cannot wrap past n, back to it
            return none, FRAME_BAD_COUNTS, t
        starts[t + 1] = starts[t] + c
        need += c * (8 + 4 * dims[t])
        floats += c * dims[t]
    if starts[tables] != n:
        return none, FRAME_BAD_COUNTS, tables
    if need > max_answer:
        return none, FRAME_TOO_BIG, need
    keys = body[8 * tables : 8 * (tables + n)].view(np.int64)
    known = (
        body[8 * (tables + n) : 8 * (tables + 2 * n)].view(np.int64)
        if with_known
        else (np.empty(0, np.int64))
    )
    if elsewhere.shape[0]:
        for t in range(tables):
            for i in range(starts[t], starts[t + 1]):
                if elsewhere[shard_at[t] + shard_of_key(keys[i], num_shards[t])]:
                    return none, FRAME_NOT_HELD, t
    at = head + 16 * tables + 8 * n
    out = np.empty(at + 4 * floats, np.uint8)
    out[head : head + 8 * tables].view(np.int64)[:] = dims
    rows = out[head + 8 * tables : head + 16 * tables].view(np.int64)
    versions = out[head + 16 * tables : at].view(np.int64)
    values = out[at:].view(np.float32)
    used = lookup_into(
        buckets, masks, keys, starts, known, t_values, t_ver, t_dead, dims, versions, rows,
        values,
    )  # fmt: skip
    return out, FRAME_OK, at + 4 * used


class FramePlan:
    """A lookup frame's tables at one store, resolved once: their arrays (``_arrays``), and
    the shards of each held elsewhere (``holding``; none flagged without one).

    Why: a serving node asks a holder the same tables in every frame, and resolving the
    names, building the checks and validating the parts each frame cost a holder more CPU
    than the lookup; on 2 cores, 4 holders' per-frame cost is what a scatter waits for.
    Kept in ``ekko.store.layout.kept`` (``frame_plan``): dropped with the arrays it holds.
    """

    def __init__(self, store: Store, names: bytes, holding: Holding | None) -> None:
        self.store, self.names, self.holding = store, names, holding
        self.catalog = store.catalog_version
        self.tables = [store.table(name) for name in names.decode("utf-8").split("\n")]
        self.arrays = _arrays(self.tables)
        self.num_shards = np.array([t.num_shards for t in self.tables], np.int64)
        self.shard_at = np.zeros(len(self.tables), np.int64)
        np.cumsum(self.num_shards[:-1], out=self.shard_at[1:])
        self.elsewhere = np.zeros(0, np.uint8)
        if holding is not None and holding.scoped:
            self.elsewhere = np.concatenate(
                [~holding.held_shards(t.name, t.num_shards) for t in self.tables]
            ).view(np.uint8)

    def valid_for(self, store: Store, holding: Holding | None) -> bool:
        return (
            self.store is store
            and self.holding is holding
            and self.catalog == store.catalog_version
        )

    def answer(
        self, body: np.ndarray, n: int, with_known: bool, head: int, max_answer: int
    ) -> tuple[np.ndarray, int, int]:
        """``_answer_frame`` of ``body`` (uint8, C-contiguous) over these tables."""
        a = self.arrays
        return _answer_frame(
            a.buckets, a.masks, a.values, a.versions, a.dead, a.dims, self.num_shards,
            self.elsewhere, self.shard_at, body, n, with_known, head, max_answer,
        )  # fmt: skip


def frame_plan(store: Store, names: bytes, holding: Holding | None) -> FramePlan:
    """The plan of a frame naming ``names`` (utf-8, one table a line) at ``store``, kept
    until a table's arrays are replaced (``layout.bump``) or the catalog changes."""
    key = ("frame", id(store), names)
    plan = layout.kept.get(key)
    if plan is None or not plan.valid_for(store, holding):
        if len(layout.kept) >= MAX_KEPT:
            layout.kept.clear()
        plan = FramePlan(store, names, holding)
        layout.kept[key] = plan
    return plan
