"""Row columns grow by doubling, keep every row, and prepare the next capacity ahead when the
table grows on its own (no page-fault burst at the doubling)."""

from __future__ import annotations

import numpy as np
import pytest

import ekko.store.index as index_mod
import ekko.store.row_arrays as row_arrays_mod
from ekko.store import BadRowsError, Table
from ekko.store.row_arrays import RowArrays, check_slots
from ekko.store.spec import TableSpec


def test_grow_to_keeps_the_used_rows_and_zeroes_the_rest() -> None:
    rows = RowArrays(16, dim=2)
    rows.keys[:10] = np.arange(10)
    rows.values[:10] = 1.5
    rows.lanes[:10] = 2
    rows.grow_to(40, used=10)
    assert rows.cap == 64 and all(a.shape[0] == 64 for a in rows.columns())
    assert rows.keys[:10].tolist() == list(range(10)) and not rows.keys[10:].any()
    assert (rows.values[:10] == 1.5).all() and not rows.values[10:].any()
    assert rows.columns()[4][:10].tolist() == [2] * 10
    rows.grow_to(64, used=10)  # fits: nothing replaced
    assert rows.cap == 64


def test_prefault_prepares_the_next_capacity_only_after_growing_on_its_own(monkeypatch) -> None:
    monkeypatch.setattr(row_arrays_mod, "PREFAULT_MIN_BYTES", 0)
    rows = RowArrays(16, dim=2)
    rows.prefault(15)
    assert rows.next is None  # sized up front: expected to fit
    rows.grow_to(17, used=16)  # grew on its own, to 32 rows
    rows.prefault(16)
    assert rows.next is None  # not yet past half of the new capacity
    rows.prefault(20)
    assert rows.next is not None and rows.next[0].shape[0] == 64
    rows.grow_to(33, used=20)  # the prepared arrays are the new columns
    assert rows.cap == 64 and rows.next is None
    rows.reserve(1000, used=33)
    rows.prefault(600)
    assert rows.next is None  # reserved: no next capacity prepared


def test_check_slots_names_the_problem() -> None:
    assert check_slots(np.array([0, 2], dtype=np.int32), 3).dtype == np.int64
    with pytest.raises(BadRowsError, match=r"slots must be in \[0, 3\)"):
        check_slots(np.array([3]), 3)
    with pytest.raises(BadRowsError, match="1-D"):
        check_slots(np.zeros((1, 1), dtype=np.int64), 3)
    with pytest.raises(BadRowsError, match="integer"):
        check_slots(np.array([0.5]), 3)


# -- through the table ---------------------------------------------------------------------------


def test_growth_keeps_rows() -> None:
    t = Table(TableSpec("t", 4, 2), initial_rows=16, cache_capacity=8)
    keys = np.arange(5000, dtype=np.int64) * 31
    vals = np.repeat(keys[:, None], 4, axis=1).astype(np.float32)
    t.write(keys[:10], vals[:10], now_ns=1)
    t.apply(keys, vals, np.full(5000, 10**6), np.zeros(5000, dtype=np.int64), 1)
    got, ver, found = t.lookup(keys)
    assert found.all() and (got == vals).all() and (ver == 10**6).all()
    assert t.statistics().capacity >= 5000


def _grow_by_writes(t: Table, keys: np.ndarray, batch: int) -> None:
    t.max_abs = np.inf  # each row holds its key (up to 1e5), to be checked after growth
    for lo in range(0, len(keys), batch):
        k = keys[lo : lo + batch]
        t.write(k, np.repeat(k[:, None], t.dim, axis=1).astype(np.float32), now_ns=1)


def test_growth_prefaults_the_next_capacity_and_keeps_every_row(monkeypatch) -> None:
    """A table that grows on its own prepares the next capacity a slice per write (here from
    the first doubling on: the size floor is lifted); rows, versions and the index come
    through every doubling intact, the same as in a table sized up front."""
    monkeypatch.setattr(row_arrays_mod, "PREFAULT_MIN_BYTES", 0)
    monkeypatch.setattr(index_mod, "PREFAULT_MIN_BYTES", 0)
    keys = (np.arange(6000, dtype=np.int64) * 7919) % 100_003
    grown = Table(TableSpec("t", 4, 3), initial_rows=16, cache_capacity=64)
    prepared = []
    for lo in range(0, len(keys), 50):
        _grow_by_writes(grown, keys[lo : lo + 50], 50)
        prepared.append(grown._rows.next is not None)
    assert any(prepared)  # the next capacity was being faulted in ahead of need
    sized = Table(TableSpec("t", 4, 3), initial_rows=16, cache_capacity=64)
    sized.reserve(len(keys))
    _grow_by_writes(sized, keys, 50)
    assert sized._rows.next is None  # reserved: no next capacity prepared
    assert grown.digest() == sized.digest() and grown.rows == len(keys)
    got, ver, found = grown.lookup(keys)
    assert found.all() and (got[:, 0] == keys).all()
    assert (ver == sized.lookup(keys)[1]).all()
