"""WindowedQuality: exact-enough AUC, exact log loss / CTR / calibration, expiry (DESIGN §6)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ekko.quality.errors import QualityConfigError
from ekko.quality.windowed import LIFETIME, WINDOW, QualitySnapshot, WindowedQuality, metric_name


def exact_auc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Rank (Mann-Whitney) AUC with tied scores counted as 1/2."""
    _, inverse, counts = np.unique(preds, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    avg_rank = ends - (counts - 1) / 2.0  # 1-based average rank per distinct score
    ranks = avg_rank[inverse]
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ctr_batch(rng: np.random.Generator, n: int, noise: float = 0.7):
    z = rng.normal(-2.5, 1.3, n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(np.int64)
    preds = 1 / (1 + np.exp(-(z + rng.normal(0, noise, n))))
    return preds, labels


@pytest.mark.parametrize("seed", range(5))
def test_windowed_auc_matches_exact_within_reported_bound(seed: int) -> None:
    rng = np.random.default_rng(seed)
    wq = WindowedQuality(window_s=60.0, buckets=6)
    chunks = [ctr_batch(rng, 3000) for _ in range(5)]
    for i, (p, y) in enumerate(chunks):
        wq.update(p, y, now=1.0 + 5.0 * i)
    snap = wq.compute(now=25.0)
    p = np.concatenate([c[0] for c in chunks])
    y = np.concatenate([c[1] for c in chunks])
    exact = exact_auc(p, y)
    assert snap.count == p.size
    assert abs(snap.auc - exact) <= snap.auc_tie_bound + 1e-12
    assert abs(snap.auc - exact) < 1e-3  # the documented typical precision for 1000 bins
    assert snap.auc_tie_bound < 2e-3


def test_auc_is_exact_when_scores_fall_in_distinct_bins() -> None:
    rng = np.random.default_rng(7)
    levels = np.array([0.001, 0.01, 0.05, 0.2, 0.5, 0.9])
    p = rng.choice(levels, 5000)
    y = (rng.random(5000) < p).astype(int)
    wq = WindowedQuality(60.0)
    wq.update(p, y, now=0.0)
    assert wq.compute(0.0).auc == pytest.approx(exact_auc(p, y), abs=1e-12)


def test_log_loss_ctr_and_calibration_are_exact() -> None:
    rng = np.random.default_rng(1)
    p, y = ctr_batch(rng, 10_000)
    wq = WindowedQuality(60.0)
    wq.update(p, y, now=3.0)
    s = wq.compute(3.0)
    ll = -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))
    assert s.log_loss == pytest.approx(ll, rel=1e-9)
    assert s.ctr == pytest.approx(y.mean())
    assert s.calibration == pytest.approx(p.mean() / y.mean())
    assert s.positives == int(y.sum())


def test_calibration_of_a_model_predicting_twice_the_rate() -> None:
    y = np.zeros(1000, int)
    y[:50] = 1  # 5 % positives
    wq = WindowedQuality(10.0)
    wq.update(np.full(1000, 0.1), y, now=0.0)
    assert wq.compute(0.0).calibration == pytest.approx(2.0)


def test_old_buckets_expire_and_lifetime_keeps_everything() -> None:
    wq = WindowedQuality(window_s=60.0, buckets=6)  # 10 s buckets
    wq.update(np.full(100, 0.9), np.zeros(100, int), now=5.0)  # bucket 0: terrible
    wq.update(np.full(10, 0.2), np.r_[np.ones(2, int), np.zeros(8, int)], now=35.0)  # bucket 3
    assert wq.compute(59.9).count == 110
    s = wq.compute(61.0)  # bucket 6: window holds buckets 1..6, bucket 0 expired
    assert s.count == 10
    assert s.ctr == pytest.approx(0.2)
    assert wq.lifetime(61.0).count == 110
    assert wq.compute(95.0).count == 0  # bucket 9: window 4..9, bucket 3 gone too
    assert wq.lifetime(95.0).window_s == math.inf


def test_ring_reuse_after_a_long_gap_drops_stale_data() -> None:
    wq = WindowedQuality(window_s=60.0, buckets=6)
    wq.update(np.full(7, 0.5), np.ones(7, int), now=5.0)
    wq.update(np.full(3, 0.5), np.zeros(3, int), now=605.0)  # same ring slot, 10 windows later
    s = wq.compute(605.0)
    assert (s.count, s.positives) == (3, 0)


def test_late_feedback_counts_in_the_newest_bucket() -> None:
    wq = WindowedQuality(window_s=60.0, buckets=6)
    wq.update(np.full(4, 0.5), np.ones(4, int), now=100.0)
    wq.update(np.full(4, 0.5), np.zeros(4, int), now=20.0)  # clock went back: kept, not lost
    assert wq.compute(100.0).count == 8


def test_empty_and_single_class_windows_do_not_raise() -> None:
    wq = WindowedQuality(30.0)
    empty = wq.compute(0.0)
    assert empty.count == 0
    assert all(math.isnan(v) for v in (empty.auc, empty.log_loss, empty.calibration, empty.ctr))
    wq.update(np.array([0.1, 0.3]), np.array([0, 0]), now=1.0)
    only_neg = wq.compute(1.0)
    assert math.isnan(only_neg.auc) and math.isnan(only_neg.calibration)
    assert math.isfinite(only_neg.log_loss) and only_neg.ctr == 0.0
    wq.update(np.array([], float), np.array([], int), now=2.0)  # empty batch is fine
    assert wq.compute(2.0).count == 2


def test_extreme_predictions_are_clipped_not_infinite() -> None:
    wq = WindowedQuality(30.0)
    wq.update(np.array([0.0, 1.0]), np.array([1, 0]), now=0.0)
    s = wq.compute(0.0)
    assert math.isfinite(s.log_loss) and s.auc == 0.0


def test_take_interval_is_non_overlapping() -> None:
    wq = WindowedQuality(300.0)
    wq.update(np.full(5, 0.5), np.ones(5, int), now=10.0)
    first = wq.take_interval(20.0)
    wq.update(np.full(3, 0.5), np.zeros(3, int), now=25.0)
    second = wq.take_interval(30.0)
    assert (first.count, second.count) == (5, 3)
    assert (first.window_s, second.window_s) == (10.0, 10.0)
    assert wq.take_interval(40.0).count == 0
    assert wq.compute(40.0).count == 8


def test_metric_names_come_from_one_composer() -> None:
    assert metric_name("ctr", "online", "auc", WINDOW) == "ctr.online.auc.window"
    with pytest.raises(QualityConfigError, match="variant"):
        metric_name("ctr", "on.line", "auc", WINDOW)
    wq = WindowedQuality(30.0)
    wq.update(np.array([0.2, 0.7]), np.array([0, 1]), now=0.0)
    names = wq.metrics("ctr", "baseline", 0.0)
    assert names["ctr.baseline.auc.window"] == 1.0
    assert names["ctr.baseline.count.lifetime"] == 2.0
    assert set(names) == {
        metric_name("ctr", "baseline", m, w)
        for m in ("count", "auc", "log_loss", "calibration", "ctr")
        for w in (WINDOW, LIFETIME)
    }


def test_snapshot_is_frozen() -> None:
    s = WindowedQuality(30.0).compute(0.0)
    assert isinstance(s, QualitySnapshot)
    with pytest.raises(AttributeError):
        s.count = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window_s": 0.0}, "window_s"),
        ({"window_s": 10.0, "buckets": 0}, "buckets"),
        ({"window_s": 10.0, "bins": 1}, "bins"),
    ],
)
def test_config_errors_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(QualityConfigError, match=field):
        WindowedQuality(**kwargs)


def test_bad_feedback_is_rejected() -> None:
    wq = WindowedQuality(30.0)
    with pytest.raises(ValueError, match="labels"):
        wq.update(np.array([0.5]), np.array([2]), now=0.0)
    with pytest.raises(ValueError, match="preds"):
        wq.update(np.array([1.5]), np.array([1]), now=0.0)
    with pytest.raises(ValueError, match="preds has 2"):
        wq.update(np.array([0.5, 0.4]), np.array([1]), now=0.0)
