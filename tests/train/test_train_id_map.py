"""IdMap against a dict reference: random int64 ids (negative, huge, the extremes)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.train.id_map import MISSING, IdMap

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
SMALL = st.integers(min_value=-20, max_value=20)  # so removals and lookups hit
IDS = st.lists(st.one_of(INT64, SMALL), max_size=40)
OPS = st.lists(st.tuples(st.sampled_from(["insert", "remove"]), IDS), max_size=12)


@settings(max_examples=150, deadline=None)
@given(ops=OPS, probe=IDS)
def test_map_equals_a_dict_under_random_inserts_and_removals(ops, probe) -> None:
    m = IdMap()
    ref: dict[int, int] = {}
    next_slot = 0
    for op, raw in ops:
        ids = list(dict.fromkeys(raw))
        if op == "insert":
            new = [i for i in ids if i not in ref]
            slots = list(range(next_slot, next_slot + len(new)))
            next_slot += len(new)
            m.insert(np.array(new, dtype=np.int64), np.array(slots, dtype=np.int64))
            ref.update(zip(new, slots, strict=True))
        else:
            got = m.remove(np.array(ids, dtype=np.int64))
            assert got.tolist() == [ref.pop(i, MISSING) for i in ids]
        assert len(m) == len(ref)
    keys = [*probe, *ref]
    want = [ref.get(k, MISSING) for k in keys]
    assert m.lookup(np.array(keys, dtype=np.int64)).tolist() == want
    ids, slots = m.items()
    assert dict(zip(ids.tolist(), slots.tolist(), strict=True)) == ref


def test_insert_refuses_an_id_held_or_repeated() -> None:
    m = IdMap()
    m.insert(np.array([5, -(2**63)]), np.array([0, 1]))
    with pytest.raises(ValueError, match="mapped already"):
        m.insert(np.array([5]), np.array([2]))
    with pytest.raises(ValueError, match="unique"):
        m.insert(np.array([7, 7]), np.array([2, 3]))
    assert m.lookup(np.array([5, -(2**63), 7])).tolist() == [0, 1, MISSING]


def test_churn_reuses_the_buckets_of_removed_ids() -> None:
    m = IdMap(64)
    buckets = m._slots.shape[0]
    rng = np.random.default_rng(0)
    ref: dict[int, int] = {}
    for round_ in range(2_000):
        new = rng.integers(-(2**63), 2**63 - 1, size=8, dtype=np.int64)
        new = np.array([k for k in dict.fromkeys(new.tolist()) if k not in ref], dtype=np.int64)
        m.insert(new, np.arange(new.size) + round_)
        ref.update(zip(new.tolist(), (np.arange(new.size) + round_).tolist(), strict=True))
        if len(ref) > 48:
            gone = np.array(list(ref)[: len(ref) - 40], dtype=np.int64)
            assert m.remove(gone).tolist() == [ref.pop(k) for k in gone.tolist()]
    assert m._slots.shape[0] == buckets  # 16 000 inserts, live ids <= 56: never grew
    ids, slots = m.items()
    assert dict(zip(ids.tolist(), slots.tolist(), strict=True)) == ref
    assert m.lookup(ids).tolist() == slots.tolist()
