"""The bench entry point runs and reports consistent counts (no timing assertions)."""

from __future__ import annotations

from ekko.bench.train_throughput import measure
from ekko.train.dlrm import DLRMConfig
from ekko.train.streams import StreamConfig

SMALL_STREAM = StreamConfig(seed=3, max_vocab=5_000, initial_items=2_000)
SMALL_MODEL = DLRMConfig(rows_per_table=4_000, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1))


def test_measure_reports_both_variants() -> None:
    result = measure(
        4,
        64,
        block=2,
        warmup=1,
        model_config=SMALL_MODEL,
        stream_config=SMALL_STREAM,
    )
    assert result["steps"] == 4 and result["batch_size"] == 64
    assert result["events_per_s_plain"] > 0 and result["events_per_s_publish"] > 0
    assert 0 < result["publisher_share"] < 1
    assert 0 < result["rows_per_step"] <= 64 * SMALL_MODEL.num_sparse
