"""Admission: the count-min sketch's bounds, count and probability policies, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.train.admission import ADMISSION_KINDS, Admission, AdmissionConfig, CountMinSketch


def test_sketch_never_underestimates_and_is_exact_without_collisions() -> None:
    rng = np.random.default_rng(1)
    ids = rng.integers(-(2**63), 2**63 - 1, size=3_000, dtype=np.int64)
    truth = rng.integers(1, 5, size=ids.size)
    sketch = CountMinSketch(width=2048, depth=4, seed=0)  # crowded, below a halving
    for _ in range(2):
        sketch.add(ids, truth)
    est = sketch.estimate(ids)
    assert (est >= 2 * truth).all()
    roomy = CountMinSketch(width=1 << 20, depth=4)
    roomy.add(ids[:100], truth[:100])
    assert roomy.estimate(ids[:100]).tolist() == truth[:100].tolist()


def test_sketch_halves_after_ten_widths_of_sightings() -> None:
    sketch = CountMinSketch(width=16, depth=2)
    sketch.add(np.array([7]), np.array([100]))
    assert sketch.estimate(np.array([7]))[0] == 100
    sketch.add(np.array([8]), np.array([60]))  # 160 sightings = 10 * width
    assert sketch.estimate(np.array([7]))[0] == 50


def test_count_admission_admits_on_the_threshold_th_sighting() -> None:
    adm = Admission(AdmissionConfig(kind="count", threshold=3, sketch_width=1 << 16))
    ids = np.array([-1, 2**62, 0], dtype=np.int64)
    assert adm.admit(ids, np.array([1, 2, 3])).tolist() == [False, False, True]
    assert adm.admit(ids[:2], np.array([1, 1])).tolist() == [False, True]
    assert adm.admit(ids[:1], np.array([1])).tolist() == [True]


def test_probability_admission_rate_matches_p_and_repeats_with_the_seed() -> None:
    cfg = AdmissionConfig(kind="probability", probability=0.25, seed=4)
    ids = np.arange(20_000, dtype=np.int64)
    once = Admission(cfg).admit(ids, np.ones(ids.size, dtype=np.int64))
    assert abs(once.mean() - 0.25) < 0.02
    assert (Admission(cfg).admit(ids, np.ones(ids.size, dtype=np.int64)) == once).all()
    twice = Admission(cfg).admit(ids, np.full(ids.size, 2))  # 1 - 0.75**2
    assert abs(twice.mean() - 0.4375) < 0.02


@pytest.mark.parametrize("kind", ADMISSION_KINDS)
def test_every_kind_admits_nothing_of_an_empty_batch(kind) -> None:
    out = Admission(AdmissionConfig(kind=kind)).admit(np.empty(0, np.int64), np.empty(0, np.int64))
    assert out.shape == (0,)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kind", "sometimes", "admission.kind"),
        ("threshold", 0, "admission.threshold"),
        ("sketch_width", 0, "admission.sketch_width"),
        ("sketch_depth", 17, "admission.sketch_depth"),
        ("probability", 0.0, "admission.probability"),
        ("threshold", "2", "admission.threshold"),  # from Python: not a bare TypeError
        ("threshold", True, "admission.threshold"),  # a bool is not a count
        ("sketch_width", 2.0, "admission.sketch_width"),
        ("probability", float("nan"), "admission.probability"),
        ("probability", "0.5", "admission.probability"),
        ("seed", -1, "admission.seed"),
        ("idle_rows", "yes", "admission.idle_rows"),
    ],
)
def test_bad_config_names_the_field(field, value, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdmissionConfig(**{field: value})
