"""A trainer started over a store that holds its trained model resumes from it (issue 13 §2):
it predicts what the trainer before it predicted and writes no seed weight over a trained one.

On the old main ``bootstrap`` published the seed dense tensors over the trained ones, and
those spread to every replica: a restarted source served an untrained model."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.spec import TableSpec
from ekko.train.dlrm import dense_table_name, embedding_table_name
from ekko.train.service import TrainingService
from ekko.train.streams import SyntheticStream


def _trained_store(config, stream_config, steps: int = 30) -> tuple[Store, TrainingService]:
    store = Store()
    svc = TrainingService("ctr", config, WritePort(store), dense_interval_s=0.0)
    svc.bootstrap(WritePort(store).stored)
    svc.start()
    batches = SyntheticStream(stream_config).batches(64)
    for _ in range(steps):
        svc.submit(next(batches))
    svc.stop()  # finishes the queue and publishes what is pending
    assert svc.statistics().batches == steps
    return store, svc


def _table_state(store: Store) -> dict[str, tuple[int, int]]:
    return {name: (t.digest(), t.rows) for name, t in store.tables.items()}


def test_restarted_trainer_predicts_as_before_and_overwrites_nothing(
    small_model_config, small_stream_config
):
    store, before = _trained_store(small_model_config, small_stream_config)
    held_out = next(SyntheticStream(small_stream_config).batches(256))
    want = before.trainer.predict(held_out)
    seed = TrainingService("ctr", small_model_config, WritePort(Store())).trainer.predict(held_out)
    assert not np.allclose(want, seed, atol=1e-4)  # the trained model is not the seed's
    tables = _table_state(store)

    after = TrainingService("ctr", small_model_config, WritePort(store), dense_interval_s=0.0)
    loaded = after.bootstrap(WritePort(store).stored)

    np.testing.assert_array_equal(after.trainer.predict(held_out), want)
    assert _table_state(store) == tables  # not one row rewritten, dense or embedding
    assert loaded == sum(t.rows for t in store.tables.values())
    for key, tensor in before.model.dense_state().items():
        np.testing.assert_array_equal(after.model.dense_state()[key].numpy(), tensor.numpy())


def test_resumed_trainer_keeps_training_and_publishes_its_steps(
    small_model_config, small_stream_config
):
    store, _before = _trained_store(small_model_config, small_stream_config)
    after = TrainingService("ctr", small_model_config, WritePort(store), dense_interval_s=0.0)
    after.bootstrap(WritePort(store).stored)
    dense = dense_table_name("top.0.bias")
    version = store.table(dense).lookup(np.zeros(1, np.int64))[1][0]
    after.start()
    batches = SyntheticStream(small_stream_config).batches(64)
    for _ in range(5):
        after.submit(next(batches))
    after.stop()
    st = after.statistics()
    assert (st.batches, st.failed, sum(st.rejected_steps.values())) == (5, None, 0)
    values, versions, _ = store.table(dense).lookup(np.zeros(1, np.int64))
    assert versions[0] > version and np.isfinite(values).all()
    np.testing.assert_array_equal(values[0], after.model.dense_state()["top.0.bias"].numpy())


def test_empty_store_gets_the_seed_dense_tensors(small_model_config):
    store = Store()
    svc = TrainingService("ctr", small_model_config, WritePort(store))
    assert svc.bootstrap(WritePort(store).stored) == 0
    for key, tensor in svc.model.dense_state().items():
        values, _, found = store.table(dense_table_name(key)).lookup(np.zeros(1, np.int64))
        assert found[0]
        np.testing.assert_array_equal(values[0], tensor.numpy().reshape(-1))
    assert store.table(embedding_table_name(0)).rows == 0  # embeddings: when trained


def test_dense_tensors_the_store_lacks_are_published_the_rest_loaded(small_model_config):
    store = Store()
    sink = WritePort(store)
    kept = dense_table_name("bottom.0.bias")
    width = small_model_config.bottom_mlp[0]
    sink.create_table(TableSpec(kept, width, 1))
    sink.write(kept, np.zeros(1, np.int64), np.full((1, width), 0.25, np.float32))
    version = store.table(kept).lookup(np.zeros(1, np.int64))[1][0]
    svc = TrainingService("ctr", small_model_config, sink)
    svc.bootstrap(sink.stored)
    assert (svc.model.dense_state()["bottom.0.bias"].numpy() == 0.25).all()
    svc.publisher.flush()
    assert store.table(kept).lookup(np.zeros(1, np.int64))[1][0] == version  # not republished
    seed = TrainingService("ctr", small_model_config, WritePort(Store())).model.dense_state()
    lacking = store.table(dense_table_name("top.0.bias")).lookup(np.zeros(1, np.int64))[0]
    np.testing.assert_array_equal(lacking[0], seed["top.0.bias"].numpy())


def test_rows_the_model_has_no_place_for_are_skipped(small_model_config, caplog):
    store = Store()
    TrainingService("ctr", small_model_config, WritePort(store)).bootstrap()
    dim, rows = small_model_config.embedding_dim, small_model_config.rows_per_table
    emb = embedding_table_name(0)
    keys = np.array([5, rows, rows + 7, -3], np.int64)  # only 5 is inside the table
    WritePort(store).write(emb, keys, np.full((4, dim), 0.5, np.float32))
    dense = dense_table_name("top.2.bias")
    WritePort(store).write(dense, np.array([9], np.int64), np.full((1, 1), 7.0, np.float32))
    svc = TrainingService("ctr", small_model_config, WritePort(store))
    svc.bootstrap(WritePort(store).stored)
    weight = svc.model.sparse.embedding_bags[emb].weight.detach().numpy()
    assert (weight[5] == 0.5).all()
    assert svc.model.dense_state()["top.2.bias"].item() != 7.0  # key 9 is not the tensor
    assert "no place for" in caplog.text and emb in caplog.text


def test_rows_of_another_shape_are_refused_naming_the_table(small_model_config):
    store = Store()
    sink = WritePort(store)
    sink.create_table(TableSpec(dense_table_name("top.2.bias"), 3, 1))
    sink.write(dense_table_name("top.2.bias"), np.zeros(1, np.int64), np.ones((1, 3), np.float32))
    svc = TrainingService("ctr", small_model_config, sink)
    with pytest.raises(ValueError, match=r"top\.2\.bias.*3 values for a tensor of shape \(1,\)"):
        svc.bootstrap(sink.stored)
