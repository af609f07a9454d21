"""KeyIndex and shard_of: the numba map against a dict, and the shard hash pinned."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ekko.store.index as index_mod
from ekko.store import BadRowsError, KeyIndex, shard_of
from ekko.store.reference import shard_of_key, splitmix64

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
KEYS = st.one_of(st.integers(-50, 300), I64)
OPS = st.lists(
    st.tuples(st.sampled_from(["insert", "lookup", "remove"]), st.lists(KEYS, max_size=80)),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, capacity=st.integers(1, 64), prefault=st.booleans())
def test_index_matches_dict(
    ops: list[tuple[str, list[int]]], capacity: int, prefault: bool
) -> None:
    """DESIGN.md §2 (key→row index): insert, lookup and remove agree with a dict (a removed
    key's slot reused, the last freed first), through growth and marker sweeps — also when
    every rehash uses a bucket array prepared ahead (the size floor lifted)."""
    with patch.object(index_mod, "PREFAULT_MIN_BYTES", 0 if prefault else 1 << 62):
        _index_matches_dict(ops, capacity)


def _index_matches_dict(ops: list[tuple[str, list[int]]], capacity: int) -> None:
    idx = KeyIndex(capacity)
    model: dict[int, int] = {}
    free: list[int] = []
    given = 0
    for op, keys in ops:
        arr = np.array(keys, dtype=np.int64)
        if op == "insert":
            got = idx.insert(arr)
            want = []
            for k in keys:
                if k not in model:
                    if free:
                        model[k] = free.pop()
                    else:
                        model[k], given = given, given + 1
                want.append(model[k])
        elif op == "remove":
            got = idx.remove(arr)
            want = []
            for k in keys:
                slot = model.pop(k, -1)
                want.append(slot)
                if slot >= 0:
                    free.append(slot)
        else:
            got = idx.lookup(arr)
            want = [model.get(k, -1) for k in keys]
        assert got.tolist() == want
        assert len(idx) == len(model) and idx.high_water == given
        assert idx.free_slots == len(free)
        assert 2 * len(idx) <= idx.capacity


def test_new_keys_get_slots_in_order_of_first_appearance() -> None:
    idx = KeyIndex()
    assert idx.insert(np.array([7, 3, 7, 9, 3], dtype=np.int64)).tolist() == [0, 1, 0, 2, 1]
    assert idx.insert(np.array([9, 11], dtype=np.int64)).tolist() == [2, 3]
    assert idx.lookup(np.array([11, 12, 7], dtype=np.int64)).tolist() == [3, -1, 0]


def test_growth_keeps_every_key() -> None:
    idx = KeyIndex(16)
    keys = np.arange(100_000, dtype=np.int64) * 1_000_003 - 7
    assert (idx.insert(keys) == np.arange(keys.size)).all()
    assert (idx.lookup(keys) == np.arange(keys.size)).all()
    assert 2 * len(idx) <= idx.capacity


def test_rehash_uses_the_prepared_buckets_and_reserve_prepares_none() -> None:
    with patch.object(index_mod, "PREFAULT_MIN_BYTES", 0):
        idx = KeyIndex(16)
        keys = np.arange(3000, dtype=np.int64) * 31 + 5
        prepared = []
        for lo in range(0, keys.size, 10):
            assert (idx.insert(keys[lo : lo + 10]) == np.arange(lo, lo + 10)).all()
            prepared.append(idx._next is not None)
        assert any(prepared)
        assert (idx.lookup(keys) == np.arange(keys.size)).all()
        idx.reserve(100_000)
        assert idx._next is None
        idx.insert(np.arange(10, dtype=np.int64) - 100)
        assert idx._next is None  # sized on purpose: nothing prepared ahead


def test_out_buffer_is_filled() -> None:
    idx = KeyIndex()
    buf = np.full(10, -5, dtype=np.int64)
    got = idx.insert(np.array([4, 5], dtype=np.int64), out=buf)
    assert got.tolist() == [0, 1] and buf[:2].tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [np.int32, np.uint64, np.float64])
def test_wrong_key_dtype_is_refused(dtype: type) -> None:
    idx = KeyIndex()
    with pytest.raises(BadRowsError, match=np.dtype(dtype).name):
        idx.insert(np.arange(3).astype(dtype))
    assert len(idx) == 0


def test_splitmix64_is_the_standard_one() -> None:
    # First outputs of the reference splitmix64 generator seeded with 0.
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def test_shard_of_is_pinned() -> None:
    """DESIGN.md §2: every store shards the same way, on every process and machine."""
    keys = np.array([0, 1, -1, 2**62, -(2**63), 2**63 - 1, 123456789], dtype=np.int64)
    want = [shard_of_key(int(k), 1000) for k in keys]
    assert shard_of(keys, 1000).tolist() == want
    assert shard_of(np.array([0], dtype=np.int64), 2**31).tolist() == [0xE220A8397B1DCDAF % 2**31]


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(I64, max_size=50), num_shards=st.integers(1, 10_000))
def test_shard_of_matches_python(keys: list[int], num_shards: int) -> None:
    got = shard_of(np.array(keys, dtype=np.int64), num_shards)
    assert got.dtype == np.int64
    assert got.tolist() == [shard_of_key(k, num_shards) for k in keys]


def test_shard_of_refuses_bad_input() -> None:
    with pytest.raises(BadRowsError, match="float64"):
        shard_of(np.zeros(2), 4)
    with pytest.raises(BadRowsError, match="num_shards"):
        shard_of(np.zeros(2, dtype=np.int64), 0)


def test_steady_churn_reuses_slots_and_keeps_the_capacity() -> None:
    """Keys come and go (each removed after a while): slots and buckets are reused, deleted
    markers are swept, and neither the slots nor the buckets grow past the live set's need."""
    idx = KeyIndex(1024)
    live = 1000
    idx.insert(np.arange(live, dtype=np.int64))
    for step in range(200):
        old = np.arange(step * 50, step * 50 + 50, dtype=np.int64)
        new = old + live
        assert (idx.remove(old) >= 0).all()
        slots = idx.insert(new)
        assert (slots < live).all()  # freed slots, not new ones
    assert len(idx) == live and idx.high_water == live and idx.capacity == 2048
    keys = np.arange(200 * 50, 200 * 50 + live, dtype=np.int64)
    assert np.sort(idx.lookup(keys)).tolist() == list(range(live))
    assert (idx.lookup(np.arange(200 * 50, dtype=np.int64)) == -1).all()
