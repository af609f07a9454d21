"""ekko bench lifecycle's summary: distinct ids counted per table (most, least, tables at
10x the budget, within it, in between), the memory slope over the training samples only,
bytes and tombstones; the AUC pair over model seeds (median and worst gap)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ekko.bench.lifecycle import LifecycleSpec, _auc, _summary


def _sample(t: float, rss: float, rows: int, tombstones: int, purged: int) -> dict:
    node = {"rows_max": rows, "rows_total": 2 * rows, "tombstones": tombstones,
            "tombstones_purged": purged, "rss_mb": rss, "digests": {}}  # fmt: skip
    return {"t": t, "nodes": {"source": node, "r": dict(node, rss_mb=rss / 2)}}


def test_summary_counts_tables_and_fits_memory_over_training_only() -> None:
    spec = LifecycleSpec(row_budget=10, duration_s=100.0, warmup_fraction=0.2)
    samples = [_sample(t, 100.0 + t, min(10, int(t)), int(t), 0) for t in range(0, 101, 5)]
    samples.append(_sample(130.0, 900.0, 10, 3, 97))  # after training: a jump the fit skips
    run = SimpleNamespace(
        samples=samples,
        nodes=["source", "r"],
        distinct=[set(range(100)), set(range(7)), set(range(250)), set(range(99))],
        trained=1024,
        trained_until=101.0,
    )
    s = _summary(spec, run, True, {"bounded": 0.8, "unbounded": 0.81})
    assert (s["distinct_ids"], s["distinct_ids_min"], s["tables_at_10x"]) == (250, 7, 2)
    assert (s["tables_in_budget"], s["tables_over_budget_below_10x"]) == (1, 1)
    assert s["distinct_ids_per_table"] == [100, 7, 250, 99]
    assert s["rss_slope_mb_per_min"] == {"source": pytest.approx(60.0), "r": pytest.approx(30.0)}
    assert s["max_rows"] == {"source": 10, "r": 10}
    assert s["row_bytes"] == {"bounded": 20 * 32, "unbounded": 456 * 32}  # dim 8, float32
    assert s["tombstones_max"] == 100
    assert s["tombstones_purged"] == {"source": 97, "r": 97}


def test_auc_reports_every_seed_with_median_and_worst_gap() -> None:
    spec = LifecycleSpec(seeds=(0, 1, 2))
    runs = [
        {
            "auc": {"bounded": b, "unbounded": u},
            "auc_bounded_minus_unbounded": b - u,
            "scored_events": [10, 20],
        }
        for b, u in ((0.80, 0.801), (0.79, 0.7935), (0.81, 0.8102))
    ]
    got = _auc(spec, runs)
    assert (got["bounded"], got["unbounded"], got["scored_events"]) == (0.80, 0.801, [10, 20])
    assert got["bounded_minus_unbounded"] == [-0.001, -0.0035, -0.0002]
    assert (got["median_gap"], got["worst_gap"]) == (-0.001, -0.0035)
