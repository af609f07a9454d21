"""Priority p = (p_g + p_u) * p_m: significance, traffic shares, the default function."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.schedule import (
    DEFAULT_MODEL,
    DefaultPriority,
    PriorityFunction,
    PriorityInputs,
    SignificanceTracker,
    TrafficShares,
    delta_norms,
)


def _inputs(
    delta: np.ndarray, is_new: np.ndarray | None = None, table: str = "t"
) -> PriorityInputs:
    n = delta.shape[0]
    return PriorityInputs(
        table,
        np.arange(n, dtype=np.int64),
        delta.astype(np.float64),
        np.zeros(n, bool) if is_new is None else is_new,
    )


def test_delta_norms_is_l2_of_difference() -> None:
    old = np.array([[0, 0, 0], [1, 1, 1]], np.float32)
    new = np.array([[3, 4, 0], [1, 1, 1]], np.float32)
    np.testing.assert_allclose(delta_norms(old, new), [5.0, 0.0])
    with pytest.raises(ValueError):
        delta_norms(old, new[:, :2])


def test_inputs_validate_shapes() -> None:
    with pytest.raises(ValueError):
        PriorityInputs("t", np.arange(3), np.zeros(2), np.zeros(3, bool))


def test_significance_is_delta_over_running_mean() -> None:
    tr = SignificanceTracker(half_life_rows=1e9, sample=10_000)
    d = np.full(1000, 2.0)
    tr.update("t", d)
    assert tr.mean("t") == pytest.approx(2.0)
    np.testing.assert_allclose(tr.significance("t", np.array([1.0, 4.0])), [0.5, 2.0])
    assert tr.mean("other") is None


def test_significance_first_batch_ranks_against_itself_and_ignores_new_keys() -> None:
    tr = SignificanceTracker()
    d = np.array([1.0, 3.0, 100.0])
    is_new = np.array([False, False, True])
    np.testing.assert_allclose(tr.significance("t", d, is_new), [0.5, 1.5, 50.0])
    tr.update("t", d, is_new)
    assert tr.mean("t") == pytest.approx(2.0)


def test_significance_guards_zero_mean() -> None:
    tr = SignificanceTracker()
    tr.update("t", np.zeros(10))
    p = tr.significance("t", np.array([0.0, 1e-3]))
    assert p[0] == 0.0
    assert np.isfinite(p[1]) and p[1] > 1e6


def test_significance_sampling_is_cheap_and_unbiased() -> None:
    rng = np.random.default_rng(1)
    tr = SignificanceTracker(half_life_rows=1e6, sample=4096, seed=3)
    for _ in range(20):
        tr.update("t", rng.exponential(3.0, size=50_000))
    m = tr.mean("t")
    assert m is not None and m == pytest.approx(3.0, rel=0.03)


def test_significance_follows_a_lasting_shift_but_not_a_blip() -> None:
    rng = np.random.default_rng(2)
    tr = SignificanceTracker(half_life_rows=1_000_000)
    for _ in range(40):
        tr.update("t", rng.exponential(1.0, 100_000))
    tr.update("t", rng.exponential(100.0, 2_000))  # blip of huge changes
    m = tr.mean("t")
    assert m is not None and m < 1.25  # a long memory: the blip does not rescale everything
    for _ in range(100):
        tr.update("t", rng.exponential(10.0, 100_000))
    m = tr.mean("t")
    assert m is not None and m == pytest.approx(10.0, rel=0.05)


def test_traffic_shares_default_equal_then_follow_reports() -> None:
    ts = TrafficShares(window_s=10.0)
    ts.register("a_emb", "a")
    ts.register("b_emb", "b")
    assert ts.importance("a_emb") == pytest.approx(0.5)
    assert ts.model_of("unknown_table") == DEFAULT_MODEL
    ts.report("a", 300, now=0.0)
    ts.report("b", 100, now=0.0)
    assert ts.importance("a_emb") == pytest.approx(0.75)
    assert ts.importance("b_emb") == pytest.approx(0.25)
    # Much later, only b is served: a's old traffic has decayed away.
    ts.report("b", 100, now=100.0)
    assert ts.importance("b_emb") > 0.99
    assert ts.importance("unknown_table") == 0.0
    with pytest.raises(ValueError):
        ts.report("a", -1, now=101.0)


def test_traffic_shares_floor() -> None:
    ts = TrafficShares(floor=0.01)
    ts.register("x", "a")
    ts.register("y", "b")
    ts.report("a", 10, now=0.0)
    assert ts.importance("y") == pytest.approx(0.01)


def test_default_priority_formula() -> None:
    tr = SignificanceTracker(half_life_rows=1e9)
    tr.update("t", np.full(100, 2.0))
    ts = TrafficShares()
    ts.register("t", "m1")
    ts.register("u", "m2")
    ts.report("m1", 1, now=0.0)
    ts.report("m2", 3, now=0.0)
    fn = DefaultPriority(tr, ts, freshness_boost=10.0)
    assert isinstance(fn, PriorityFunction)
    p = fn(_inputs(np.array([2.0, 4.0, 0.0]), np.array([False, False, True])))
    np.testing.assert_allclose(p, [(1 + 0) * 0.25, (2 + 0) * 0.25, (0 + 10) * 0.25])


def test_default_priority_model_scope_shares_one_mean() -> None:
    tr = SignificanceTracker(half_life_rows=1e9)
    ts = TrafficShares()
    ts.register("t1", "m")
    ts.register("t2", "m")
    fn = DefaultPriority(tr, ts, scope="model")
    fn.observe(_inputs(np.full(10, 4.0), table="t1"))
    assert tr.mean("m") == pytest.approx(4.0)
    np.testing.assert_allclose(fn(_inputs(np.array([8.0]), table="t2")), [2.0])


def test_hot_key_priority_ranks_often_written_keys_first_and_cools_down():
    from ekko.schedule.priority import DefaultPriority, HotKeyPriority, PriorityInputs

    base = DefaultPriority(
        SignificanceTracker(half_life_rows=1e6, sample=64, seed=0), TrafficShares(window_s=60.0)
    )
    hot = HotKeyPriority(base, half_life_rows=1_000.0, slots=1 << 12)
    hot_keys = np.arange(10, dtype=np.int64)
    for _ in range(20):
        hot.observe(PriorityInputs("t", hot_keys, np.ones(10), np.zeros(10, bool)))
    batch = PriorityInputs("t", np.array([0, 1, 500, 501]), np.ones(4), np.zeros(4, bool))
    base.observe(batch)
    p = hot(batch)
    assert p[0] > 5 * p[2] and p[1] > 5 * p[3]
    fresh = hot(PriorityInputs("t", np.array([0, 9999]), np.ones(2), np.array([False, True])))
    assert fresh[1] > fresh[0]  # a new key ranks as the hottest key, plus its freshness
    warm = hot.heat("t", hot_keys[:1])[0]
    hot.observe(
        PriorityInputs("t", np.arange(1000, 11_000), np.ones(10_000), np.zeros(10_000, bool))
    )
    assert hot.heat("t", hot_keys[:1])[0] < warm / 100  # ten half-lives later
    with pytest.raises(ValueError, match="power of two"):
        HotKeyPriority(base, slots=1000)


def test_rows_every_prediction_reads_rank_as_the_hottest_key():
    from ekko.schedule.priority import DefaultPriority, HotKeyPriority, PriorityInputs

    base = DefaultPriority(
        SignificanceTracker(half_life_rows=1e6, sample=64, seed=0), TrafficShares(window_s=60.0)
    )
    hot = HotKeyPriority(base, half_life_rows=1_000.0, slots=1 << 12, read_by_all=("dense/",))
    for _ in range(20):
        hot.observe(PriorityInputs("emb", np.arange(10), np.ones(10), np.zeros(10, bool)))
    one = np.ones(1)
    dense = hot(PriorityInputs("dense/top.0.weight", np.array([0]), one, np.zeros(1, bool)))
    cold = hot(PriorityInputs("emb", np.array([500]), one, np.zeros(1, bool)))
    hottest = hot(PriorityInputs("emb", np.array([0]), one, np.zeros(1, bool)))
    assert dense[0] > 5 * cold[0]
    assert dense[0] == pytest.approx(hottest[0], rel=0.1)
    # The same under a model's table namespace, and only there.
    assert hot.reads_all("ctr/dense/top.0.weight") and hot.reads_all("dense/x")
    assert not hot.reads_all("ctr/emb_0") and not hot.reads_all("ctr/densex")
