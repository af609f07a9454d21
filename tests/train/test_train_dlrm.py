"""DLRM shapes, and serving over store lookups matches the trained model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ekko.torch import EmbeddingPublisher, MemorySink, PublisherConfig
from ekko.train.dlrm import DLRM, DLRMConfig, DLRMServingModel
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig


def test_config_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="bottom_mlp"):
        DLRMConfig(embedding_dim=8, bottom_mlp=(64, 16))
    with pytest.raises(ValueError, match="top_mlp"):
        DLRMConfig(top_mlp=(64, 2))
    with pytest.raises(ValueError, match="rows_per_table"):
        DLRMConfig(rows_per_table=0)


def test_forward_shapes_and_hashing(small_model_config: DLRMConfig) -> None:
    model = DLRM(small_model_config)
    dense = torch.randn(5, 13)
    sparse = torch.randint(0, 10**9, (5, 26))
    logits = model(dense, sparse)
    assert logits.shape == (5,)
    same = model(dense, sparse % small_model_config.rows_per_table)
    torch.testing.assert_close(logits, same)
    assert set(model.table_names().values()) == {f"emb_{i}" for i in range(26)}
    assert "bottom.0.weight" in model.dense_state()
    assert not any(k.startswith("sparse.") for k in model.dense_state())


def test_same_seed_same_model(small_model_config: DLRMConfig) -> None:
    a, b = DLRM(small_model_config), DLRM(small_model_config)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)


def test_serving_from_published_rows_matches_training_model(
    small_model_config: DLRMConfig, small_stream_config: StreamConfig
) -> None:
    model = DLRM(small_model_config)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=model.table_names()))
    pub.snapshot()  # the store starts as a full copy
    trainer = OnlineTrainer(model, TrainerConfig(), pub)
    batches = SyntheticStream(small_stream_config).batches(256)
    for events in itertools.islice(batches, 5):
        trainer.step(events)
    pub.flush()
    held_out = next(batches)
    serving = DLRMServingModel(small_model_config, sink.lookup)
    np.testing.assert_allclose(
        serving.predict(held_out.dense, held_out.sparse),
        trainer.predict(held_out),
        rtol=0,
        atol=1e-5,
    )
    # With the dense weights handed over directly, too.
    direct = DLRMServingModel(small_model_config, sink.lookup, model.dense_state())
    np.testing.assert_allclose(
        direct.predict(held_out.dense, held_out.sparse), trainer.predict(held_out), atol=1e-5
    )


def test_serving_lags_until_rows_are_published(
    small_model_config: DLRMConfig, small_stream_config: StreamConfig
) -> None:
    """Without publishing, the replica keeps the old model: parity depends on the publisher."""
    model = DLRM(small_model_config)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=model.table_names()))
    pub.snapshot()
    pub.close()
    trainer = OnlineTrainer(model, TrainerConfig())
    batches = SyntheticStream(small_stream_config).batches(256)
    for events in itertools.islice(batches, 5):
        trainer.step(events)
    held_out = next(batches)
    serving = DLRMServingModel(small_model_config, sink.lookup)
    gap = np.abs(serving.predict(held_out.dense, held_out.sparse) - trainer.predict(held_out))
    assert gap.max() > 1e-3
