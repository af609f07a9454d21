"""PendingPredictions against a dict model: joins, eviction, one join per id, counter wrap.

Model: a prediction is remembered while it is among the last ``capacity`` issued and has not
been labelled; each id joins at most once.
"""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.serve.pending import PendingPredictions

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 7)),
        st.tuples(st.just("take"), st.lists(st.integers(0, 40), max_size=10)),
    ),
    max_size=30,
)


@given(capacity=st.integers(1, 12), script=ops)
@settings(max_examples=200, deadline=None)
def test_matches_a_bounded_dict(capacity: int, script: list) -> None:
    p = PendingPredictions(capacity)
    model: dict[int, float] = {}  # id -> ctr
    issued: list[int] = []
    evicted = 0
    for op, arg in script:
        if op == "add":
            ctr = np.arange(len(issued), len(issued) + arg, dtype=np.float32)
            ids = p.add(ctr, np.zeros(arg, np.uint8))
            assert len(set(ids.tolist()) | set(issued)) == len(issued) + arg  # never reused
            for i, c in zip(ids.tolist(), ctr.tolist(), strict=True):
                model[i] = c
                issued.append(i)
            # The ring keeps the last `capacity` predictions issued; older unlabelled ones go.
            for old in issued[: max(0, len(issued) - capacity)]:
                if model.pop(old, None) is not None:
                    evicted += 1
        else:
            # Pick among issued ids (and some never-issued ones) by index.
            want = [issued[k] if k < len(issued) else 7 + k for k in arg]
            j = p.take(np.array(want, dtype=np.int64))
            expect_idx, expect_ctr = [], []
            seen = set()
            for pos, i in enumerate(want):
                if i in model and i not in seen:
                    expect_idx.append(pos)
                    expect_ctr.append(model.pop(i))
                seen.add(i)
            assert j.index.tolist() == expect_idx
            assert j.ctr.tolist() == expect_ctr
            assert j.unknown == len(want) - len(expect_idx)
        assert len(p) == len(model)
        assert p.evicted == evicted


def test_ids_stay_unique_and_joinable_across_the_counter_wrap() -> None:
    p = PendingPredictions(100)
    p._next = 2**32 - 3
    ids = p.add(np.linspace(0, 1, 6, dtype=np.float32), np.zeros(6, np.uint8))
    assert len(set(ids.tolist())) == 6
    assert len({int(i) >> 32 for i in ids}) == 2  # a fresh prefix after the wrap
    assert (ids < 2**53).all()
    j = p.take(ids)
    assert j.unknown == 0
    np.testing.assert_allclose(j.ctr, np.linspace(0, 1, 6, dtype=np.float32))
