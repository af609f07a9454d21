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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from numba import njit, typed, types

from ekko.store import layout
from ekko.store._validate import check_keys
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, probe_slot
from ekko.store.row_arrays import RowArrays

if TYPE_CHECKING:
    from ekko.store.table import Table

_BUCKETS = types.int64[::1]
_VALUES = types.float32[:, ::1]
_VERSIONS = types.int64[::1]
_DEAD = types.uint8[::1]


@njit(cache=True, nogil=True)
def _lookup_all(
    buckets: typed.List,
    masks: np.ndarray,
    keys: np.ndarray,
    starts: np.ndarray,
    known: np.ndarray,
    t_values: typed.List,
    t_ver: typed.List,
    t_dead: typed.List,
    dims: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table ``t``'s keys ``keys[starts[t]:starts[t + 1]]`` looked up in its arrays
    (``buckets[t]``, ``masks[t]``, ``t_values[t]``, ...): each key's version (0: missing or
    a tombstone), each table's count of rows with values, and the values of each row whose
    version is not ``known[i]`` (all rows if ``known`` is empty; a missing row's values are
    zeros), table after table."""
    n = keys.shape[0]
    tables = dims.shape[0]
    floats = 0
    for t in range(tables):
        floats += (starts[t + 1] - starts[t]) * dims[t]
    out_ver = np.empty(n, np.int64)
    out_values = np.empty(floats, np.float32)
    rows = np.empty(tables, np.int64)
    check = known.shape[0] > 0
    at = 0
    for t in range(tables):
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
    return out_ver, rows, out_values[:at]


class _Arrays(NamedTuple):
    """The arrays of a set of tables as ``_lookup_all`` takes them."""

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
    versions, rows, values = _lookup_all(
        a.buckets, a.masks, k, st, kn, a.values, a.versions, a.dead, a.dims
    )
    return FrameRows(versions, rows, values)
