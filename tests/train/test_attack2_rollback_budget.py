"""A rollback of a model whose dynamic tables are full (their row budgets or the node's
memory budget): the guard deletes the rows created since the healthy point and writes the
evicted ones back (``SourceGuard.rollback``), and the trainer must then hold what the store
holds — the healthy point's ids, within the budget. It kept the ids created since (their
store rows deleted) and, finding no free row, dropped the restored ones, then deleted them
from the store at its next publish: the rollback undid itself."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ekko.guard.source_guard import SourceGuard
from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.clock import FakeClock
from ekko.store.holding import row_bytes
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.service import TrainingService
from ekko.train.streams import SyntheticStream

TABLES, ROW_BUDGET = 4, 30


def _emb(store: Store) -> dict[str, dict[int, tuple]]:
    out = {}
    for name, t in store.tables.items():
        if name.startswith("emb_"):
            keys, values, *_ = t.all_rows()
            out[name] = {int(k): tuple(v.tolist()) for k, v in zip(keys, values, strict=True)}
    return out


def _held(svc: TrainingService) -> dict[str, set[int]]:
    return {n: set(t.live()[0].tolist()) for n, t in svc.model.sparse.dynamic_tables().items()}


@pytest.mark.parametrize("memory_rows", [None, 60])  # row budgets only; a memory budget too
def test_a_rollback_of_full_dynamic_tables_leaves_the_trainer_holding_what_the_store_holds(
    small_model_config, small_stream_config, memory_rows
):
    dim = small_model_config.embedding_dim
    cfg = dataclasses.replace(
        small_model_config,
        num_sparse=TABLES,
        dynamic=DynamicEmbeddingConfig(row_budget=ROW_BUDGET, eviction=EvictionConfig("lru")),
        memory_budget_bytes=None if memory_rows is None else memory_rows * row_bytes(dim),
    )
    clock = FakeClock()
    store = Store(origin=0)
    port = WritePort(store, clock=clock)
    svc = TrainingService("ctr", cfg, port)
    svc.publisher.snapshot()
    names = [*svc.publisher.table_names, *svc.publisher.dense_table_names]
    guard = SourceGuard("ctr", port, names, svc, [], lambda p, b: None, None, margin_s=0.0,
                        quarantine_s=0.0, clock=clock)  # fmt: skip
    batches = SyntheticStream(
        dataclasses.replace(small_stream_config, num_sparse=TABLES, num_item_features=2)
    )
    stream = batches.batches(64)
    for _ in range(3):
        clock.advance(1.0)
        svc.trainer.step(next(stream))
    clock.advance(1.0)
    healthy_at, healthy = clock.wall(), _emb(store)
    guard.tick(healthy_at)  # a healthy checkpoint (no replica to wait for)
    for _ in range(3):  # new ids evict the healthy point's: the tables stay full
        clock.advance(1.0)
        svc.trainer.step(next(stream))
    assert any(set(healthy[n]) - set(rows) for n, rows in _emb(store).items())

    guard.rollback(healthy_at, "test")
    assert _emb(store) == healthy  # the guard's restore: exactly the healthy rows
    held = _held(svc)
    assert {n: set(rows) for n, rows in healthy.items()} == held  # and the trainer's ids
    for name, table in svc.model.sparse.dynamic_tables().items():  # with their values
        ids, slots = table.live()
        weight = table.embedding.weight.detach().numpy()
        want = [healthy[name][i] for i in ids.tolist()]
        assert np.allclose(weight[slots], np.asarray(want).reshape(-1, dim)), name

    svc.resume()
    clock.advance(1.0)
    svc.trainer.step(next(stream))  # its publish deletes no healthy row it still holds
    after, held = _emb(store), _held(svc)
    assert {n: set(rows) for n, rows in after.items()} == held
    if memory_rows is not None:
        assert sum(map(len, after.values())) <= memory_rows
