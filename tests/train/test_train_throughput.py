"""The bench entry point runs and reports consistent counts (no timing assertions)."""

from __future__ import annotations

from ekko.train.dlrm import DLRMConfig
from ekko.train.streams import StreamConfig
from ekko.train.throughput import measure


def test_measure_reports_both_variants(
    small_model_config: DLRMConfig, small_stream_config: StreamConfig
) -> None:
    result = measure(
        4,
        64,
        block=2,
        warmup=1,
        model_config=small_model_config,
        stream_config=small_stream_config,
    )
    assert result["steps"] == 4 and result["batch_size"] == 64
    assert result["events_per_s_plain"] > 0 and result["events_per_s_publish"] > 0
    assert 0 < result["publisher_share"] < 1
    assert 0 < result["rows_per_step"] <= 64 * small_model_config.num_sparse
