"""The publisher writes exactly the rows an optimizer step changed, for any model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from ekko.store.spec import TableSpec
from ekko.torch import EmbeddingPublisher, MemorySink, PublisherConfig
from ekko.train.dlrm import DLRM, DLRMConfig
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig


def _weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        name: m.weight.detach().numpy().copy()
        for name, m in model.named_modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
    }


def _changed_rows(before: np.ndarray, after: np.ndarray) -> set[int]:
    return set(np.flatnonzero((before != after).any(axis=1)).tolist())


def _writes_since(sink: MemorySink, mark: int) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for table, keys in sink.writes[mark:]:
        out.setdefault(table, []).append(keys)
    return {t: np.concatenate(k) for t, k in out.items()}


def _assert_published_exactly_the_changes(
    sink: MemorySink,
    mark: int,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    names: dict[str, str],
) -> None:
    written = _writes_since(sink, mark)
    for qual, table in names.items():
        keys = written.get(table, np.empty(0, dtype=np.int64))
        assert len(np.unique(keys)) == len(keys), f"{table}: duplicate keys in one publish"
        changed = _changed_rows(before[qual], after[qual])
        assert changed, f"{table}: the step changed nothing; the test would prove nothing"
        assert set(keys.tolist()) == changed, table
        stored = np.stack([sink.tables[table][k] for k in keys.tolist()])
        np.testing.assert_array_equal(stored, after[qual][keys])


@pytest.mark.parametrize("optimizer", ["adam", "adagrad"])
def test_dlrm_step_publishes_exactly_changed_rows(
    optimizer: str, small_model_config: DLRMConfig, small_stream_config: StreamConfig
) -> None:
    model = DLRM(small_model_config)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=model.table_names()))
    trainer = OnlineTrainer(model, TrainerConfig(optimizer=optimizer), pub)
    for events in itertools.islice(SyntheticStream(small_stream_config).batches(256), 3):
        before = _weights(model)
        mark = len(sink.writes)
        trainer.step(events)
        _assert_published_exactly_the_changes(
            sink, mark, before, _weights(model), model.table_names()
        )


class TwoTables(nn.Module):
    """Not a DLRM: a padded nn.Embedding and a weighted, offset-driven nn.EmbeddingBag."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.words = nn.Embedding(50, 4, padding_idx=0, sparse=True)
        self.tags = nn.EmbeddingBag(30, 4, mode="sum", sparse=True)
        self.out = nn.Linear(8, 1)

    def forward(
        self, words: torch.Tensor, tags: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        a = self.words(words).sum(dim=1)
        b = self.tags(tags, offsets=offsets, per_sample_weights=w)
        return self.out(torch.cat([a, b], dim=1)).squeeze(1)


def _custom_step(model: TwoTables, opts: list[torch.optim.Optimizer], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(0, 50, (6, 3), generator=g)
    words[0, 0] = 0  # padding
    tags = torch.randint(0, 30, (9,), generator=g)
    offsets = torch.tensor([0, 2, 2, 5, 7, 8])
    w = torch.rand(9, generator=g) + 0.1
    for opt in opts:
        opt.zero_grad()
    loss = model(words, tags, offsets, w).pow(2).mean()
    loss.backward()
    for opt in opts:
        opt.step()


def test_any_model_embedding_and_bag_with_offsets_weights_and_padding() -> None:
    model = TwoTables()
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam([model.words.weight, model.tags.weight], lr=0.05),
        torch.optim.Adam(model.out.parameters(), lr=0.05),
    ]
    names = {"words": "words", "tags": "tags"}
    for seed in range(3):
        before = _weights(model)
        mark = len(sink.writes)
        _custom_step(model, opts, seed)
        pub.publish()
        _assert_published_exactly_the_changes(sink, mark, before, _weights(model), names)
        assert 0 not in _writes_since(sink, mark)["words"].tolist()
    assert sink.specs["words"] == TableSpec("words", 4, 16)
    assert sink.specs["dense/out.weight"] == TableSpec("dense/out.weight", 8, 1)
    pub.flush()  # dense tensors wait for dense_interval_s, or a flush
    np.testing.assert_array_equal(
        sink.tables["dense/out.weight"][0], model.out.weight.detach().numpy().ravel()
    )


def test_no_grad_lookups_and_failed_lookups_are_not_recorded() -> None:
    model = TwoTables()
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink)
    with torch.no_grad():
        model.words(torch.tensor([[1, 2, 3]]))
    with pytest.raises(IndexError):
        model.words(torch.tensor([[4, 999]]))
    pub.publish()
    assert "words" not in {table for table, _ in sink.writes}
    assert pub.statistics().rows_published == 0


def test_table_names_mapping_and_validation() -> None:
    model = TwoTables()
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names={"tags": "emb_tags"}))
    assert pub.table_names == ["words", "emb_tags"]
    assert pub.dense_table_names == ["dense/out.weight", "dense/out.bias"]
    with pytest.raises(ValueError, match="'out'"):
        EmbeddingPublisher(model, sink, PublisherConfig(table_names={"out": "x"}))
    with pytest.raises(ValueError, match="duplicate"):
        EmbeddingPublisher(model, sink, PublisherConfig(table_names={"tags": "words"}))
    with pytest.raises(ValueError, match="dense_interval_s"):
        PublisherConfig(dense_interval_s=-1)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _dense_writes(sink: MemorySink, mark: int) -> int:
    return sum(1 for table, _ in sink.writes[mark:] if table == "dense/out.weight")


def test_dense_published_at_most_every_interval_and_on_flush() -> None:
    model = TwoTables()
    sink = MemorySink()
    clock = FakeClock()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(dense_interval_s=1.0), clock=clock)
    opts: list[torch.optim.Optimizer] = [
        torch.optim.SparseAdam([model.words.weight, model.tags.weight], lr=0.05),
        torch.optim.Adam(model.out.parameters(), lr=0.05),
    ]
    published_at = []
    for i, t in enumerate([0.0, 0.3, 0.9, 1.0, 1.5, 1.99, 2.2, 2.5]):
        clock.now = t
        mark = len(sink.writes)
        _custom_step(model, opts, i)
        pub.publish()
        if _dense_writes(sink, mark):
            published_at.append(t)
    assert published_at == [0.0, 1.0, 2.2]
    # Changed since 2.2: flush writes it now, whatever the interval.
    mark = len(sink.writes)
    pub.flush()
    assert _dense_writes(sink, mark) == 1
    np.testing.assert_array_equal(
        sink.tables["dense/out.weight"][0], model.out.weight.detach().numpy().ravel()
    )
    # Unchanged since the flush: nothing to write, even when due.
    clock.now = 10.0
    mark = len(sink.writes)
    pub.publish()
    pub.flush()
    assert _dense_writes(sink, mark) == 0


def test_statistics_count_rows_and_bytes(small_model_config: DLRMConfig) -> None:
    model = DLRM(small_model_config)
    sink = MemorySink()
    pub = EmbeddingPublisher(model, sink, PublisherConfig(table_names=model.table_names()))
    trainer = OnlineTrainer(model, TrainerConfig(), pub)
    events = next(SyntheticStream(StreamConfig(seed=1, max_vocab=5_000)).batches(128))
    trainer.step(events)
    stats = pub.statistics()
    embedding_rows = sum(len(k) for t, k in sink.writes if t.startswith("emb_"))
    assert stats.rows_published == embedding_rows > 0
    assert stats.publishes == 1
    assert stats.dense_tensors_published == len(model.dense_state())
    row_bytes = sum(len(k) * (8 + 4 * sink.specs[t].dim) for t, k in sink.writes)
    assert stats.bytes_published == row_bytes
