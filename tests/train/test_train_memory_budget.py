"""A memory budget shared by a model's dynamic tables (issue 18's budget per node): the
globally least valuable rows leave across tables, bytes never pass the budget, evictions of
another table's rows reach its module (fresh rows) and the sink (deletes)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store.holding import row_bytes
from ekko.train.admission import ADMISSION_KINDS, AdmissionConfig
from ekko.train.dlrm import DLRMConfig
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
from ekko.train.eviction import EVICTION_KINDS, RANKED_KINDS, EvictionConfig
from ekko.train.memory_budget import MemoryBudget
from ekko.train.service import TrainingService
from ekko.train.sink import MemorySink
from ekko.train.slots import Slots
from ekko.train.streams import SyntheticStream

RB = row_bytes(4)


class OrderedSink(MemorySink):
    """Logs the order of writes and deletes, one list per publish (``mark`` starts one)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[str]] = [[]]

    def mark(self) -> None:
        self.calls.append([])

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        super().write(table, keys, values)
        self.calls[-1].append("write")

    def delete(self, table: str, keys: np.ndarray) -> None:
        super().delete(table, keys)
        self.calls[-1].append("delete")


def slots(
    memory: MemoryBudget,
    budget: int = 100,
    dim: int = 4,
    admission: AdmissionConfig | None = None,
    eviction: EvictionConfig | None = None,
) -> Slots:
    return Slots(
        budget,
        admission or AdmissionConfig(),
        eviction or EvictionConfig(kind=memory.kind),
        memory=memory,
        row_bytes=row_bytes(dim),
    )


def step(*lookups: tuple[Slots, np.ndarray], now: float = 0.0) -> None:
    """One training step: each table's lookup, then the backward pass that ends it."""
    for table, ids in lookups:
        table.assign(np.asarray(ids, dtype=np.int64), now)
    for table, _ in lookups:
        table.end_step()


def held(table: Slots) -> set[int]:
    return set(table.live()[0].tolist())


@pytest.mark.parametrize("kind", RANKED_KINDS)
def test_a_hot_table_keeps_its_rows_while_a_cold_one_gives_them_up(kind) -> None:
    memory = MemoryBudget(60 * RB, EvictionConfig(kind=kind))
    hot, cold = slots(memory), slots(memory)
    hot_ids = np.arange(30)
    step((hot, hot_ids), (cold, np.arange(100, 130)))  # 60 rows: the budget is full
    for s in range(1, 11):  # the hot table's regulars come back with 5 new ids a step
        step((hot, np.concatenate([hot_ids, 1000 + 5 * s + np.arange(5)])))
        assert memory.used_bytes <= memory.max_bytes
    # a fixed split would have kept 30 cold rows; the budget took them all (50 new rows
    # were needed: the 30 cold ones, then the hot table's 20 oldest one-off ids)
    assert held(cold) == set()
    assert held(hot) >= set(hot_ids.tolist()) and hot.rows == 60
    assert cold.statistics().evicted_by == {"row_budget": 0, "node_memory": 30, "ttl": 0}
    assert hot.statistics().evicted_by["node_memory"] == 20
    assert memory.statistics().evicted == 50
    ids, gone = cold.take_freed()  # the slots the cold table's module must refresh
    assert sorted(ids.tolist()) == list(range(100, 130))
    assert sorted(gone.tolist()) == list(range(30))


@pytest.mark.parametrize("kind", ["lru", "lfu"])
def test_scores_compare_across_tables_of_unequal_traffic_and_width(kind) -> None:
    """Two tables of different widths and traffic: LFU gives up the once-seen rows of the
    wide table though they are the newest, LRU the old rows of the narrow one though they
    are the most frequent; each frees the bytes needed, counted at each table's width."""
    memory = MemoryBudget(5 * row_bytes(4) + 10 * row_bytes(8), EvictionConfig(kind=kind))
    narrow, wide = slots(memory, dim=4), slots(memory, dim=8)
    for _ in range(3):
        step((narrow, np.arange(5)))  # frequency 3, last touched in step 3
    step((wide, np.arange(10, 20)))  # frequency 1, step 4: the budget is full
    step((narrow, np.arange(5, 10)))  # 5 x 78 B wanted
    if kind == "lfu":  # 5 wide rows of 94 B (4 would free only 376 B)
        assert held(narrow) == set(range(10)) and len(held(wide)) == 5
        assert wide.statistics().evicted_by["node_memory"] == 5
    else:
        assert held(narrow) == set(range(5, 10)) and held(wide) == set(range(10, 20))
        assert narrow.statistics().evicted_by["node_memory"] == 5
    assert memory.used_bytes <= memory.max_bytes


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(EVICTION_KINDS),
    ttl=st.none() | st.floats(0.5, 20.0),
    admission=st.sampled_from(ADMISSION_KINDS),
    idle_rows=st.booleans(),
    dims=st.lists(st.integers(1, 16), min_size=1, max_size=4),
    row_budget=st.integers(1, 40),
    budget_rows=st.integers(1, 60),
    steps=st.lists(
        st.lists(st.lists(st.integers(0, 80), max_size=20), min_size=4, max_size=4),
        min_size=1,
        max_size=12,
    ),
    loads=st.lists(st.integers(0, 80), max_size=30),
)
def test_bytes_never_exceed_the_budget_after_any_step(
    kind, ttl, admission, idle_rows, dims, row_budget, budget_rows, steps, loads
) -> None:
    if kind == "ttl" and ttl is None:
        ttl = 3.0
    eviction = EvictionConfig(kind=kind, ttl_s=ttl)
    cfg = AdmissionConfig(kind=admission, threshold=2, probability=0.5, idle_rows=idle_rows)
    memory = MemoryBudget(budget_rows * row_bytes(max(dims)), eviction)
    tables = [slots(memory, row_budget, d, admission=cfg, eviction=eviction) for d in dims]
    for i, t in enumerate(tables[:1]):  # a resume from a store holding more than fits
        t.load(np.unique(np.asarray(loads, dtype=np.int64)) + 1000 * i, 0.0)
    assert memory.used_bytes <= memory.max_bytes
    for now, lookups in enumerate(steps, start=1):
        read = []
        for i, (t, ids) in enumerate(zip(tables, lookups, strict=False)):
            keys = np.asarray(ids, dtype=np.int64) + 1000 * i
            read.append((t, keys, t.assign(keys, float(now))[0]))
        for t, keys, got in read:  # no lookup of the step lost a row another one read
            assert np.array_equal(t.read(keys), got)
            t.end_step()
        used = sum(t.rows * row_bytes(d) for t, d in zip(tables, dims, strict=True))
        assert memory.used_bytes == used <= memory.max_bytes
        for t in tables:
            ids, where = t.live()
            assert t.rows == ids.size <= row_budget
            assert np.array_equal(t.read(ids), where)  # each held id reads its own row
            st_ = t.statistics()
            assert st_.evicted == sum(st_.evicted_by.values())
            if kind not in RANKED_KINDS:
                assert st_.evicted_by["node_memory"] == st_.evicted_by["row_budget"] == 0
    assert memory.statistics().evicted == sum(
        t.statistics().evicted_by["node_memory"] for t in tables
    )


def test_a_dlrm_under_a_memory_budget_keeps_the_sinks_rows_within_it(
    small_model_config, small_stream_config
) -> None:
    """The trainer and its publisher: rows another table's lookups evicted are deleted from
    the sink (every table's deletes before any write), so the rows the sink holds of the
    model's tables, priced as the store prices them, never pass the budget."""
    dim = small_model_config.embedding_dim
    budget = 120 * row_bytes(dim)  # 120 rows over 8 tables of up to 30 rows each
    cfg = dataclasses.replace(
        small_model_config,
        num_sparse=8,
        dynamic=DynamicEmbeddingConfig(row_budget=30, eviction=EvictionConfig(kind="lru")),
        memory_budget_bytes=budget,
    )
    sink = OrderedSink()
    svc = TrainingService("ctr", cfg, sink)
    distinct: set[tuple[int, int]] = set()
    stream = SyntheticStream(dataclasses.replace(small_stream_config, num_sparse=8))
    for _, events in zip(range(5), stream.batches(64), strict=False):
        sink.mark()
        svc.trainer.step(events)
        # every table's deletes before any write: the store never holds one table's new
        # rows beside the rows they replaced in another (max_memory_mb would refuse them)
        assert "delete" not in sink.calls[-1][sink.calls[-1].index("write") :]
        distinct |= {(f, int(i)) for f in range(cfg.num_sparse) for i in events.sparse[:, f]}
        emb = {n: t for n, t in sink.tables.items() if n.startswith("emb_")}
        rows = sum(len(t) for t in emb.values())
        assert rows * row_bytes(dim) <= budget
    st_ = svc.statistics()
    assert st_.memory_budget is not None and st_.memory_budget.used_bytes == rows * row_bytes(dim)
    assert len(distinct) > 5 * 120
    by_reason = [t.evicted_by for t in st_.dynamic_tables.values()]
    assert sum(r["node_memory"] for r in by_reason) > 0
    assert sum(len(keys) for _, keys in sink.deletes) >= sum(r["node_memory"] for r in by_reason)
    held = {n: set(t.live()[0].tolist()) for n, t in svc.model.sparse.dynamic_tables().items()}
    assert {n: set(t) for n, t in emb.items()} == held  # the sink holds what the model holds
    report = svc.report()["memory_budget"]
    assert report["max_bytes"] == budget and report["used_bytes"] <= budget


def test_a_reused_row_another_table_evicted_starts_fresh() -> None:
    from ekko.torch import DynamicEmbedding

    memory = MemoryBudget(2 * row_bytes(4), EvictionConfig(kind="lru"))
    cfg = DynamicEmbeddingConfig(row_budget=4)
    a = DynamicEmbedding(4, cfg, memory=memory, init_bound=0.1)
    b = DynamicEmbedding(4, cfg, memory=memory, init_bound=0.1)
    a.track_evictions()
    for m in (a, b):
        m.train()
    a(torch.tensor([1, 2])).sum().backward()
    with torch.no_grad():
        a.embedding.weight[:2] = 7.0  # trained far from any initial value
    b(torch.tensor([9, 8])).sum().backward()  # takes both of a's rows' bytes
    assert a.statistics().rows == 0 and set(a.take_evicted().tolist()) == {1, 2}
    assert a.embedding.weight[:2].abs().max() <= 0.1  # fresh rows, before a's next lookup


def test_dlrm_config_refuses_a_budget_without_dynamic_tables_or_below_a_row_each() -> None:
    with pytest.raises(ValueError, match="memory_budget_bytes needs dynamic tables"):
        DLRMConfig(memory_budget_bytes=1 << 20)
    dyn = DynamicEmbeddingConfig(row_budget=10)
    with pytest.raises(ValueError, match=r"a row of each of the 26 tables \(2652 B\)"):
        DLRMConfig(dynamic=dyn, embedding_dim=10, bottom_mlp=(10,), memory_budget_bytes=2651)
    with pytest.raises(ValueError, match="must be in"):
        MemoryBudget(0, EvictionConfig())
