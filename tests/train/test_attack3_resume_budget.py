"""A source restarted with a model's memory budget lowered (``memory_budget_mb``) while its
store holds more rows than now fit: the rows it keeps are shared out among the dynamic
tables, not given to the first tables whole while the last ones lose every row (each loss is
a delete that reaches every replica)."""

from __future__ import annotations

import pytest

from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.holding import row_bytes
from ekko.train.dlrm import DLRMConfig
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.service import TrainingService
from ekko.train.streams import StreamConfig, SyntheticStream

TABLES, ROW_BUDGET, DIM = 4, 30, 4


def _config(memory_rows: int | None) -> DLRMConfig:
    return DLRMConfig(
        num_dense=3, num_sparse=TABLES, embedding_dim=DIM, bottom_mlp=(8, DIM), top_mlp=(8, 1),
        dynamic=DynamicEmbeddingConfig(row_budget=ROW_BUDGET, eviction=EvictionConfig("rate")),
        memory_budget_bytes=None if memory_rows is None else memory_rows * row_bytes(DIM),
    )  # fmt: skip


def _emb_keys(store: Store) -> dict[str, set[int]]:
    return {n: set(t.all_rows()[0].tolist()) for n, t in store.tables.items() if "emb_" in n}


@pytest.mark.parametrize("memory_rows", [60, 90, 7])
def test_a_resume_under_a_lowered_memory_budget_shares_the_rows_among_tables(
    memory_rows,
) -> None:
    store = Store(origin=0)
    port = WritePort(store)
    before = TrainingService("ctr", _config(None), port)
    before.publisher.snapshot()
    stream = SyntheticStream(
        StreamConfig(seed=1, num_dense=3, num_sparse=TABLES, num_item_features=2)
    ).batches(256)
    for _ in range(4):
        before.trainer.step(next(stream))
    before.publisher.flush()
    stored_keys = _emb_keys(store)
    assert [len(k) for k in stored_keys.values()] == [ROW_BUDGET] * TABLES  # 120 rows

    def stored(table: str):
        t = store.tables.get(table)
        return None if t is None else t.all_rows()[:2]

    after = TrainingService("ctr", _config(memory_rows), port)
    after.bootstrap(stored)
    held = {n: set(t.live()[0].tolist()) for n, t in after.model.sparse.dynamic_tables().items()}
    assert sum(map(len, held.values())) == memory_rows  # the budget is used in full
    share = memory_rows // TABLES
    assert all(share <= len(ids) <= share + 1 for ids in held.values()), held
    for name, ids in held.items():
        assert ids <= stored_keys[name]  # rows the store held, not fresh ones
    assert _emb_keys(store) == held  # the rest deleted from the store, nothing else
