"""A lookup of several tables at once, answered into one buffer: a holder's lookup frame.

Apart from ``table`` because it is the serving path of a partition holder (a lookup stream's
frame names up to every table of a model, a few keys each), where ``Table.lookup`` per table
cost a validation, three allocations, two kernel calls, a filter and a copy each: a frame
of 26 tables x 8 keys took 135 us of a holder's CPU, on every holder a predict asks. Here
each table is one kernel call that probes the index, gathers the rows the caller does not
hold already and writes them where the answer wants them; the frame's keys are checked
once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from ekko.store._validate import check_keys
from ekko.store.errors import BadRowsError
from ekko.store.index import KeyIndex, probe_slot
from ekko.store.row_arrays import RowArrays

if TYPE_CHECKING:
    from ekko.store.table import Table


@njit(cache=True, nogil=True)
def _lookup_into(
    buckets: np.ndarray,
    mask: np.uint64,
    keys: np.ndarray,
    a: np.int64,
    b: np.int64,
    known: np.ndarray,
    t_values: np.ndarray,
    t_ver: np.ndarray,
    t_dead: np.ndarray,
    out_ver: np.ndarray,
    out_values: np.ndarray,
    at: np.int64,
) -> np.int64:
    """Versions of ``keys[a:b]`` into ``out_ver[a:b]`` (0: missing or a tombstone), and from
    ``out_values[at]`` on the values of each row whose version is not ``known[i]`` (all rows
    if ``known`` is empty; a missing row's values are zeros). Returns where the next table's
    values go."""
    dim = t_values.shape[1]
    check = known.shape[0] > 0
    for i in range(a, b):
        slot = probe_slot(buckets, mask, keys[i])
        live = slot >= 0 and not t_dead[slot]
        ver = t_ver[slot] if live else np.int64(0)
        out_ver[i] = ver
        if check and known[i] == ver:
            continue
        if live:
            for j in range(dim):
                out_values[at + j] = t_values[slot, j]
        else:
            for j in range(dim):
                out_values[at + j] = 0.0
        at += dim
    return at


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
    bounds = st.tolist()
    floats = sum((bounds[t + 1] - bounds[t]) * table.dim for t, table in enumerate(tables))
    versions = np.empty(n, np.int64)
    values = np.empty(floats, np.float32)
    rows = np.empty(len(tables), np.int64)
    at = 0
    for t, table in enumerate(tables):
        ix: KeyIndex = table._index
        r: RowArrays = table._rows
        buckets, mask = ix.probe_args()
        end = int(
            _lookup_into(buckets, mask, k, bounds[t], bounds[t + 1], kn, r.values, r.versions,
                         r.dead, versions, values, at)
        )  # fmt: skip
        rows[t] = (end - at) // table.dim
        at = end
    return FrameRows(versions, rows, values[:at])
