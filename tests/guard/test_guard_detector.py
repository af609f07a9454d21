"""Detector: no false alarms on clean streams, fast detection of a bad update (DESIGN §6)."""

from __future__ import annotations

import dataclasses
import math

import pytest
from guard_sim import simulate

from ekko.guard.detector import Detector, DetectorConfig
from ekko.guard.errors import GuardConfigError
from ekko.quality.windowed import QualitySnapshot


def snap(count: int, log_loss: float, auc: float, now: float = 0.0) -> QualitySnapshot:
    return QualitySnapshot(count, count // 20, auc, log_loss, 1.0, 0.05, 10.0, 0.0, now)


@pytest.mark.parametrize(
    ("seed", "noise_baseline"),
    [
        (0, 0.7),
        (1, 0.7),
        (2, 0.7),
        (3, 1.5),  # a poor baseline: online far better, still no alarm
        (4, 0.4),
    ],
)  # a baseline better than online: still no alarm
def test_clean_streams_raise_no_alarm(seed: int, noise_baseline: float) -> None:
    r = simulate(seed, 2000, noise_baseline=noise_baseline)
    assert r.false_alarms == 0
    assert max(v.score for v in r.verdicts) < DetectorConfig().uncertain_threshold


@pytest.mark.parametrize("bad", ["inverted", "noisy"])
@pytest.mark.parametrize("seed", range(4))
def test_bad_update_is_flagged_within_a_few_intervals(seed: int, bad: str) -> None:
    r = simulate(seed, 200, bad_from=100, bad=bad)
    assert r.false_alarms == 0
    assert min(r.delay.values()) <= 2  # uncertain, or straight to corrupted below the floor
    assert r.delay["corrupted"] <= 3


@pytest.mark.parametrize("seed", range(3))
def test_a_moderate_bias_is_flagged_eventually(seed: int) -> None:
    r = simulate(seed, 260, bad_from=100, bad="biased")
    assert "corrupted" in r.delay and r.delay["corrupted"] <= 60


def test_intervals_with_too_few_samples_are_skipped_and_keep_the_level() -> None:
    det = Detector(DetectorConfig(warmup_intervals=5, min_samples=100))
    for i in range(5):
        det.observe(snap(1000, 0.20 + 0.001 * (i % 2), 0.75), snap(200, 0.20, 0.75), now=i)
    v = det.observe(snap(1000, 0.50, 0.60), snap(200, 0.20, 0.75), now=6)
    v = det.observe(snap(1000, 0.50, 0.60), snap(200, 0.20, 0.75), now=7)
    assert v.level == "uncertain"
    skipped = det.observe(snap(1000, 0.90, 0.50), snap(50, 0.20, 0.75), now=8)
    assert skipped.skipped and skipped.level == "uncertain"
    assert "baseline count 50 < min_samples 100" in skipped.reason
    assert det.score == v.score


def test_single_class_intervals_use_log_loss_only() -> None:
    det = Detector(DetectorConfig(warmup_intervals=5))
    for i in range(5):
        det.observe(snap(1000, 0.20 + 0.001 * (i % 2), math.nan), snap(300, 0.20, math.nan), now=i)
    v = det.observe(snap(1000, 0.20, math.nan), snap(300, 0.20, math.nan), now=5)
    assert v.level == "healthy" and math.isnan(v.z_auc) and v.z_log_loss == 0.0


def test_verdict_reason_carries_the_numbers_and_reset_clears_the_score() -> None:
    det = Detector(DetectorConfig(warmup_intervals=3))
    for i in range(3):
        det.observe(snap(1000, 0.200 + 0.001 * i, 0.75), snap(300, 0.2, 0.75), now=i)
    for i in range(3, 6):
        v = det.observe(snap(1000, 0.6, 0.5), snap(300, 0.2, 0.75), now=i)
    assert v.level == "corrupted"
    assert "log_loss online 0.60000 baseline 0.20000" in v.reason
    assert "auc online 0.5000 baseline 0.7500" in v.reason
    det.reset()
    assert det.score == 0.0 and det.level == "healthy"


def test_warmup_reports_healthy_with_zero_score() -> None:
    det = Detector()
    v = det.observe(snap(1000, 0.9, 0.5), snap(300, 0.2, 0.75), now=0)
    assert (v.level, v.score) == ("healthy", 0.0) and "warmup 1/" in v.reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"k": -1.0}, "k"),
        ({"uncertain_threshold": 0.0}, "uncertain_threshold"),
        ({"corrupted_threshold": 5.0}, "corrupted_threshold"),
        ({"min_samples": 0}, "min_samples"),
        ({"warmup_intervals": 1}, "warmup_intervals"),
        ({"reference_intervals": 10}, "reference_intervals"),
        ({"z_clip": 0.5}, "z_clip"),
        ({"min_scale_auc": float("nan")}, "min_scale_auc"),
        ({"learn_below": 0.0}, "learn_below"),
    ],
)
def test_config_is_validated_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(GuardConfigError, match=f"DetectorConfig.{field} "):
        dataclasses.replace(DetectorConfig(), **change)


@pytest.mark.parametrize("seed", range(4))
def test_a_poison_during_warmup_is_corrupted_within_two_intervals(seed: int) -> None:
    """Issue 13 §3: a poison in the first minute (before the CUSUM has a reference) was
    learned as normal and never flagged; the absolute floor against the baseline catches it."""
    r = simulate(seed, 40, bad_from=5, bad="inverted")
    assert r.false_alarms == 0
    assert r.delay["corrupted"] <= 2, r.verdicts[-1].reason
    assert "below the floor" in r.verdicts[-1].reason


def test_floor_breaches_are_not_learned_and_keep_counting_after_warmup() -> None:
    det = Detector(DetectorConfig(warmup_intervals=4))
    good, bad = snap(1000, 0.20, 0.80), snap(1000, 0.70, 0.30)
    base = snap(1000, 0.20, 0.80)
    assert det.observe(good, base, 0).level == "healthy"
    assert det.observe(bad, base, 1).level == "healthy"  # one breach alone is not enough
    v = det.observe(bad, base, 2)
    assert v.level == "corrupted" and "2 in a row" in v.reason
    assert len(det._ref_auc.values) == 1  # the breaches taught the reference nothing
    for i in range(3, 8):
        det.observe(good, base, i)
    assert det.warmed_up and det.level == "healthy"
    det.observe(bad, base, 8)
    assert det.observe(bad, base, 9).level == "corrupted"


def test_reasons_print_online_minus_baseline_for_both_metrics() -> None:
    det = Detector(DetectorConfig(warmup_intervals=3))
    v = det.observe(snap(1000, 0.6, 0.55), snap(300, 0.2, 0.75), now=0)
    assert "(online - baseline +0.40000)" in v.reason  # log loss: online is worse, higher
    assert "(online - baseline -0.2000)" in v.reason  # AUC: online is worse, lower
