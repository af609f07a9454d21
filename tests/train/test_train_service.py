"""The training service: queued batches are trained in order and every step is published."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ekko.node.model_metrics import train_metrics
from ekko.train.dlrm import embedding_table_name
from ekko.train.service import TrainerBusy, TrainingService
from ekko.train.sink import MemorySink
from ekko.train.streams import Events, SyntheticStream
from ekko.train.trainer import REJECT_REASONS


def _batches(cfg, n: int, size: int = 64) -> list[Events]:
    it = SyntheticStream(cfg).batches(size)
    return [next(it) for _ in range(n)]


def test_trains_queued_batches_and_publishes_touched_rows(small_model_config, small_stream_config):
    sink = MemorySink()
    svc = TrainingService("ctr", small_model_config, sink, dense_interval_s=0.0)
    svc.bootstrap()
    assert sink.written_keys(embedding_table_name(0)) == set()  # embeddings: only when touched
    svc.start()
    batches = _batches(small_stream_config, 8)
    for b in batches:
        svc.submit(b)
    svc.stop()
    st = svc.statistics()
    assert (st.batches, st.events, st.failed) == (8, 8 * 64, None)
    touched = {int(k) for b in batches for k in b.sparse[:, 0] % small_model_config.rows_per_table}
    assert sink.written_keys(embedding_table_name(0)) == touched
    weights = svc.model.sparse.embedding_bags[embedding_table_name(0)].weight.detach().numpy()
    keys = np.array(sorted(touched), dtype=np.int64)
    np.testing.assert_array_equal(sink.lookup(embedding_table_name(0), keys), weights[keys])
    report = svc.report()
    assert report["window"]["count"] == 8 * 64 and report["publish_share"] > 0


def test_full_queue_refuses_with_trainer_busy(small_model_config, small_stream_config):
    svc = TrainingService("ctr", small_model_config, MemorySink(), max_queue=1)
    svc.start()
    with pytest.raises(TrainerBusy, match="batches queued for training"):
        for b in _batches(small_stream_config, 50):
            svc.submit(b)
    assert svc.statistics().refused >= 1
    svc.stop()


def test_failed_step_is_reported_and_refuses_further_batches(
    small_model_config, small_stream_config
):
    svc = TrainingService("ctr", small_model_config, MemorySink())
    svc.start()
    good = _batches(small_stream_config, 1)[0]
    bad = Events(good.dense[:, :3], good.sparse, good.labels, good.ts)  # wrong dense width
    svc.submit(bad)
    svc._thread.join(10)
    assert svc.statistics().failed is not None
    with pytest.raises(RuntimeError, match="trainer of model ctr failed"):
        svc.submit(good)


def test_submit_before_start_is_refused(small_model_config, small_stream_config):
    svc = TrainingService("ctr", small_model_config, MemorySink())
    with pytest.raises(RuntimeError, match="not running"):
        svc.submit(_batches(small_stream_config, 1)[0])


def _samples(svc: TrainingService) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in train_metrics({svc.name: svc})()
        for s in fam.samples
    }


def test_overflowing_batch_is_rejected_counted_and_the_trainer_keeps_training(
    small_model_config, small_stream_config, caplog
) -> None:
    sink = MemorySink()
    svc = TrainingService("ctr", small_model_config, sink, dense_interval_s=0.0)
    svc.bootstrap()
    svc.start()
    good = _batches(small_stream_config, 3)
    poison = Events(np.full_like(good[0].dense, 3e38), good[0].sparse, good[0].labels, good[0].ts)
    svc.submit(good[0])
    svc.submit(poison)  # straight to the service: the HTTP route would refuse it (400)
    svc.submit(good[1])
    svc.submit(good[2])
    svc.stop()
    st = svc.statistics()
    assert st.failed is None
    assert st.batches == 3 and sum(st.rejected_steps.values()) == 1
    assert all(bool(torch.isfinite(p).all()) for p in svc.model.parameters())
    for table, rows in sink.tables.items():
        assert all(np.isfinite(v).all() for v in rows.values()), table
    assert "training step on 64 events rejected" in caplog.text
    samples = _samples(svc)
    rejected = {
        labels: v
        for (name, labels), v in samples.items()
        if name == "ekko_train_steps_rejected_total"
    }
    assert sum(rejected.values()) == 1 and len(rejected) == len(REJECT_REASONS)
    assert samples[("ekko_train_failed", (("model", "ctr"),))] == 0.0
    report = svc.report()
    assert report["failed"] is None and sum(report["rejected_steps"].values()) == 1


def test_a_dying_trainer_is_reported_in_status_metrics_and_log(
    small_model_config, small_stream_config, caplog
) -> None:
    class Broken(MemorySink):
        def write(self, table, keys, values):
            raise OSError("disk on fire")

    svc = TrainingService("ctr", small_model_config, MemorySink(), dense_interval_s=0.0)
    svc.bootstrap()
    svc.publisher.sink = Broken()
    svc.publisher._created = True
    svc.start()
    svc.submit(_batches(small_stream_config, 1)[0])
    svc._thread.join(10)
    assert svc.statistics().failed == "OSError: disk on fire"
    assert svc.report()["failed"] == "OSError: disk on fire"
    assert _samples(svc)[("ekko_train_failed", (("model", "ctr"),))] == 1.0
    assert "Traceback" in caplog.text and "disk on fire" in caplog.text
    with pytest.raises(RuntimeError, match="trainer of model ctr failed: OSError: disk on fire"):
        svc.submit(_batches(small_stream_config, 1)[0])
