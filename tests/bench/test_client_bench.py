"""``ekko bench client``'s summary: the keys the brief names, each keyed by batch size, and
the bar judged on both the absolute rate and the ratio to JSON."""

from __future__ import annotations

from ekko.bench.client import BAR_ROWS_PER_S, ClientBenchSpec, _summary


def test_the_summary_names_each_figure_by_batch_size() -> None:
    spec = ClientBenchSpec.quick()
    publish = {"binary": {1024: [1e6, 3e6, 2.5e6], 16384: [2.2e6]},
               "json": {1024: [1e5, 9e4, 1.1e5], 16384: [1e5]}}  # fmt: skip
    lookups = {f: {b: [{"p50": 1.0 * b, "p99": 2.0 * b}] for b in spec.lookup_batches}
               for f in ("binary", "json")}  # fmt: skip
    s = _summary(spec, publish, lookups)
    assert s["binary_publish_rows_per_s"] == {"1024": 2_500_000, "16384": 2_200_000}
    assert s["json_publish_rows_per_s"] == {"1024": 100_000, "16384": 100_000}
    assert s["binary_over_json"] == {"1024": 25.0, "16384": 22.0}
    assert s["lookup_p50_ms"]["1000"] == {"binary": 1000.0, "json": 1000.0}
    assert s["lookup_p99_ms"]["100000"]["binary"] == 200_000.0
    assert s["bar"]["met"] and s["bar"]["binary_rows_per_s"] == BAR_ROWS_PER_S
    publish["binary"] = {1024: [1.9e6], 16384: [1.9e6]}
    assert not _summary(spec, publish, lookups)["bar"]["met"]
