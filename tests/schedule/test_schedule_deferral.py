"""Deferral of insignificant changes with a staleness bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.schedule import Deferrer
from ekko.schedule.deferral import last_occurrence


def test_last_occurrence() -> None:
    assert last_occurrence(np.array([3, 1, 2], np.int64)) is None
    np.testing.assert_array_equal(
        last_occurrence(np.array([5, 1, 5, 2, 1, 5], np.int64)), [5, 4, 5, 3, 4, 5]
    )


def test_hold_release_and_rewrite_keeps_first_time() -> None:
    d = Deferrer(min_significance=0.5, max_staleness_s=2.0)
    keys = np.array([1, 2, 3], np.int64)
    vals = np.array([[1.0], [2.0], [3.0]], np.float32)
    send = d.split("t", keys, np.array([0.1, 0.9, 0.2]), 10.0, values=vals)
    np.testing.assert_array_equal(send, [False, True, False])
    assert d.held("t") == 2
    # Key 1 rewritten (still tiny) at 11: keeps first time 10, gets the new value.
    send = d.split("t", np.array([1], np.int64), np.array([0.1]), 11.0, values=np.array([[7.0]]))
    assert not send[0]
    np.testing.assert_array_equal(d.held_since("t", np.array([1, 2, 3])), [10.0, np.nan, 10.0])
    # Key 3 changes a lot at 11.5: sent now, its hold is dropped.
    send = d.split("t", np.array([3], np.int64), np.array([5.0]), 11.5, values=np.array([[9.0]]))
    assert send[0] and d.held("t") == 1
    assert d.next_due() == 12.0
    assert d.due(11.9) == []
    (r,) = d.due(12.0)
    np.testing.assert_array_equal(r.keys, [1])
    np.testing.assert_array_equal(r.values, [[7.0]])
    np.testing.assert_array_equal(r.held_since, [10.0])
    assert d.held() == 0 and d.rows_deferred == 2 and d.rows_released == 1
    assert d.due(100.0) == []


def test_ineligible_rows_and_duplicates() -> None:
    d = Deferrer(0.5, 1.0)
    keys = np.array([4, 4, 5, 6], np.int64)
    sig = np.array([0.1, 0.9, 0.1, 0.1])  # key 4: last occurrence is significant
    send = d.split("t", keys, sig, 0.0, eligible=np.array([True, True, True, False]))
    np.testing.assert_array_equal(send, [True, True, False, True])
    keys = np.array([7, 7], np.int64)
    send = d.split("t", keys, np.array([0.9, 0.1]), 0.0)  # last occurrence tiny: both held
    np.testing.assert_array_equal(send, [False, False])
    assert d.held("t") == 2
    (r,) = d.flush()
    assert sorted(r.keys.tolist()) == [5, 7] and r.values is None


def test_values_must_be_given_consistently() -> None:
    d = Deferrer(0.5, 1.0)
    d.split("t", np.array([1], np.int64), np.array([0.0]), 0.0, values=np.zeros((1, 2)))
    with pytest.raises(ValueError):
        d.split("t", np.array([2], np.int64), np.array([0.0]), 0.0)


def test_compaction_keeps_held_rows() -> None:
    d = Deferrer(0.5, 1.0)
    rng = np.random.default_rng(0)
    t = 0.0
    for _ in range(40):  # many distinct keys pass through; few stay held
        keys = rng.choice(1 << 40, 10_000, replace=False).astype(np.int64)
        d.split("t", keys, np.zeros(10_000), t, values=keys[:, None].astype(np.float32))
        t += 0.5
        for r in d.due(t):
            assert np.all(r.held_since + 1.0 <= t)
            np.testing.assert_array_equal(r.values[:, 0], r.keys.astype(np.float32))
    assert len(d._tables["t"].index) < 200_000  # reclaimed, not 400 k slots
    assert d.held() == 10_000  # only the last batch is not yet due
    (r,) = d.due(t + 1.0)
    assert len(r) == 10_000


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("split"),
            st.sampled_from(["a", "b"]),
            st.lists(st.integers(0, 15), min_size=0, max_size=12),
            st.floats(0.0, 1.5),  # time step
            st.integers(0, 2**32 - 1),  # seed for significance / eligibility
        ),
        st.tuples(st.just("due"), st.floats(0.0, 3.0)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops=ops, bound=st.sampled_from([0.0, 0.5, 1.0, 2.5]))
def test_staleness_bound_and_nothing_lost(ops: list, bound: float) -> None:
    d = Deferrer(min_significance=0.5, max_staleness_s=bound)
    now = 0.0
    counter = 0
    latest: dict[tuple[str, int], float] = {}  # what the producer wrote last
    replica: dict[tuple[str, int], float] = {}  # what went out (sent now or released)
    held: dict[tuple[str, int], float] = {}  # reference model: first-deferral times

    def apply_released(rs: list, t: float | None) -> None:
        for r in rs:
            assert r.values is not None
            for k, v, h in zip(
                r.keys.tolist(), r.values[:, 0].tolist(), r.held_since.tolist(), strict=True
            ):
                assert held.pop((r.table, k)) == h
                if t is not None:
                    assert h + bound <= t  # released only once due
                replica[(r.table, k)] = v

    for op in ops:
        if op[0] == "split":
            _, table, keys, step, seed = op
            now += step
            rng = np.random.default_rng(seed)
            n = len(keys)
            k = np.array(keys, np.int64)
            sig = rng.random(n)
            eligible = rng.random(n) < 0.8
            vals = (counter + np.arange(n, dtype=np.float32))[:, None]
            counter += n
            send = d.split(table, k, sig, now, values=vals, eligible=eligible)
            last = {key: i for i, key in enumerate(keys)}
            for key, i in last.items():
                hold = sig[i] < 0.5 and eligible[i]
                assert send[i] == (not hold)
                latest[(table, key)] = float(vals[i, 0])
                if hold:
                    held.setdefault((table, key), now)
                else:
                    held.pop((table, key), None)
            for i, key in enumerate(keys):  # earlier duplicates follow the last occurrence
                assert send[i] == send[last[key]]
                if send[last[key]]:
                    replica[(table, key)] = float(vals[last[key], 0])
        else:
            now += op[1]
            apply_released(d.due(now), now)
            # nothing held longer than the bound
            assert all(first + bound > now for first in held.values())
        assert d.held() == len(held)
        nd = d.next_due()
        if held:
            assert nd is not None and nd <= min(held.values()) + bound
    # Eventually every held row is released (due at the bound, or at shutdown via flush).
    horizon = now + bound
    apply_released(d.due(horizon), horizon)
    assert not held and d.held() == 0
    assert d.flush() == []
    assert replica == latest
