"""Dynamic tables from a cluster config's ``[[models]]`` (errors name the field), and their
admission and eviction counters in the trainer's metrics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomli_w

from ekko.node.config import ConfigError, load_config
from ekko.node.model_metrics import train_metrics
from ekko.ops.cluster_init import cluster_doc
from ekko.train.admission import AdmissionConfig
from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.service import TrainingService
from ekko.train.sink import MemorySink
from ekko.train.streams import SyntheticStream


def _load(tmp_path: Path, model: dict):
    doc = cluster_doc(dcs=1, replicas=1, wan_delay_ms=[10])
    doc["models"] = [{"name": "ctr", **model}]
    path = tmp_path / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    return load_config(path).models[0]


def test_row_budget_admission_and_eviction_become_the_dlrms_dynamic_tables(tmp_path) -> None:
    m = _load(
        tmp_path,
        {
            "row_budget": 5000,
            "admission": {"kind": "count", "threshold": 3, "sketch_width": 4096, "idle_rows": True},
            "eviction": {"kind": "ttl", "ttl_s": 600.0, "lfu_aging": 3.0},
        },
    )
    assert m.dlrm().dynamic == DynamicEmbeddingConfig(
        row_budget=5000,
        admission=AdmissionConfig(kind="count", threshold=3, sketch_width=4096, idle_rows=True),
        eviction=EvictionConfig(kind="ttl", ttl_s=600.0, lfu_aging=3.0),
    )
    rate = {"kind": "rate", "rate_prior_steps": 60.0, "rate_patience": 2.5}
    assert _load(tmp_path, {"row_budget": 10, "eviction": rate}).dlrm().dynamic.eviction == (
        EvictionConfig(kind="rate", rate_prior_steps=60.0, rate_patience=2.5)
    )
    budget_only = _load(tmp_path, {"row_budget": 10}).dlrm().dynamic
    assert budget_only == DynamicEmbeddingConfig(row_budget=10)  # admit all, LRU
    assert _load(tmp_path, {}).dlrm().dynamic is None  # hashed tables, as before


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        ({"row_budget": 0}, "models.0.row_budget"),
        ({"admission": {"kind": "count"}}, "models[ctr].admission needs models[ctr].row_budget"),
        ({"row_budget": 9, "admission": {"kind": "often"}}, "models.0.admission.kind"),
        ({"row_budget": 9, "admission": {"threshold": 0}}, "models.0.admission.threshold"),
        ({"row_budget": 9, "admission": {"probability": 2}}, "models.0.admission.probability"),
        ({"row_budget": 9, "admission": {"sketch_width": 0}}, "models.0.admission.sketch_width"),
        ({"row_budget": 9, "admission": {"idle_rows": "maybe"}}, "models.0.admission.idle_rows"),
        ({"row_budget": 9, "eviction": {"kind": "fifo"}}, "models.0.eviction.kind"),
        ({"row_budget": 9, "eviction": {"kind": "ttl"}}, 'ttl_s is required with kind = "ttl"'),
        ({"row_budget": 9, "eviction": {"ttl_s": -1}}, "models.0.eviction.ttl_s"),
        ({"row_budget": 9, "eviction": {"ttl": 5}}, "models.0.eviction.ttl"),
        ({"row_budget": 9, "eviction": {"lfu_aging": 0}}, "models.0.eviction.lfu_aging"),
        ({"row_budget": 9, "eviction": {"rate_prior_steps": 0}}, "eviction.rate_prior_steps"),
        ({"row_budget": 9, "eviction": {"rate_patience": "3"}}, "eviction.rate_patience"),
        ({"row_budget": 9, "eviction": {"rate_patience": 1e7}}, "eviction.rate_patience"),
    ],
)
def test_bad_dynamic_table_config_names_the_field(tmp_path, model, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _load(tmp_path, model)


def test_trainer_metrics_count_admitted_rejected_evicted_and_rows(
    small_model_config, small_stream_config
) -> None:
    import dataclasses

    cfg = dataclasses.replace(
        small_model_config,
        dynamic=DynamicEmbeddingConfig(
            row_budget=20, admission=AdmissionConfig(kind="count", threshold=2)
        ),
    )
    svc = TrainingService("ctr", cfg, MemorySink())
    for _, events in zip(range(10), SyntheticStream(small_stream_config).batches(64), strict=False):
        svc.trainer.step(events)
    st = svc.statistics().dynamic_tables
    assert set(st) == {f"emb_{i}" for i in range(cfg.num_sparse)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in train_metrics({svc.name: svc})()
        for s in fam.samples
    }
    for table, t in st.items():
        labels = (("model", "ctr"), ("table", table))
        assert samples[("ekko_train_embedding_rows", labels)] == t.rows <= 20
        assert samples[("ekko_train_embedding_row_budget", labels)] == 20
        for what in ("admitted", "rejected", "evicted"):
            assert samples[(f"ekko_train_embedding_{what}_total", labels)] == getattr(t, what)
    assert sum(t.evicted for t in st.values()) > 0 and sum(t.rejected for t in st.values()) > 0
    assert svc.report()["dynamic_tables"]["emb_0"]["row_budget"] == 20


def test_the_demo_trains_dynamic_tables_by_default(tmp_path) -> None:
    from ekko.demo.setup import DemoSpec, cluster_config

    model = load_config(cluster_config(DemoSpec(), tmp_path)).models[0]
    dynamic = model.dlrm().dynamic
    assert dynamic is not None and dynamic.row_budget == 5_000
    assert (dynamic.admission.kind, dynamic.eviction.kind) == ("count", "lru")
    hashed = load_config(cluster_config(DemoSpec(row_budget=None), tmp_path / "h")).models[0]
    assert hashed.dlrm().dynamic is None


def _load_nodes(tmp_path: Path, model: dict, max_memory_mb: list[float | None]):
    doc = cluster_doc(dcs=1, replicas=1, wan_delay_ms=[10])
    doc["models"] = [{"name": "ctr", **model}]
    for node, mb in zip(doc["nodes"], max_memory_mb, strict=True):
        if mb is not None:
            node["max_memory_mb"] = mb
    path = tmp_path / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    return load_config(path)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (
            {"memory_budget_mb": 4.0},
            "models[ctr].memory_budget_mb needs models[ctr].row_budget",
        ),
        ({"row_budget": 9, "memory_budget_mb": 0}, "models.0.memory_budget_mb"),
        ({"row_budget": 9, "memory_budget_mb": -1.0}, "models.0.memory_budget_mb"),
        ({"row_budget": 9, "memory_budget_mb": float("nan")}, "models.0.memory_budget_mb"),
        ({"row_budget": 9, "memory_budget_mb": float("inf")}, "models.0.memory_budget_mb"),
        ({"row_budget": 9, "memory_budget_mb": "lots"}, "models.0.memory_budget_mb"),
        (
            {"row_budget": 9, "memory_budget_mb": 0.001},
            "models[ctr].memory_budget_mb = 0.001 (1048 B) holds less than a row of each of "
            "its 26 tables (26 x 126 B = 3276 B)",
        ),
    ],
)
def test_bad_memory_budget_is_refused_naming_the_field(tmp_path, model, needle) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        _load(tmp_path, model)


def test_a_node_whose_max_memory_mb_cannot_hold_the_budget_is_refused_naming_both(
    tmp_path,
) -> None:
    model = {"row_budget": 5000, "memory_budget_mb": 8.0}
    from ekko.store.holding import row_bytes

    config = _load_nodes(tmp_path, model, [None, None])
    m = config.models[0]
    assert m.dlrm().memory_budget_bytes == 8 << 20
    # the budget, the store's reservations for the model's tables and the [[tables]]
    tables = sum(t.initial_rows * row_bytes(t.dim) for t in config.tables)
    need = (m.store_bytes() + tables) / (1 << 20)
    assert 8.0 < need < 30.0
    _load_nodes(tmp_path, model, [need + 0.01, need + 0.01])  # fits
    with pytest.raises(ConfigError) as err:
        _load_nodes(tmp_path, model, [need + 0.01, 10.0])  # the replica holds the rows too
    assert re.search(
        r"nodes\[dc1-r0\]\.max_memory_mb = 10\.0 cannot hold models\[ctr\]\.memory_budget_mb "
        r"= 8\.0: with the store's reservations .* the store may count \d+\.\d\d MB",
        str(err.value),
    ), err.value


def test_the_reservations_are_what_a_store_counts_for_the_models_tables(tmp_path) -> None:
    """``ModelConfig.store_bytes`` prices the trainer's tables as the store does: a store
    given every table the publisher creates counts the reservations it adds to the budget."""
    from ekko.store.holding import Holding
    from ekko.store.store import Store

    m = _load(tmp_path, {"row_budget": 50, "memory_budget_mb": 1.0})
    sink = MemorySink()
    TrainingService("ctr", m.dlrm(), sink).publisher.flush()  # creates the model's tables
    store = Store()
    store.set_holding(Holding("n"))
    for spec in sink.specs.values():
        store.create_table(spec)
    assert len(store.tables) == 26 + 10  # 26 embedding tables, 2 + 3 layers' weight and bias
    assert store.holding is not None
    assert store.holding.used_bytes(store.tables) == m.store_bytes() - (1 << 20)


def test_trainer_metrics_count_evictions_by_reason_and_the_memory_budget(
    small_model_config, small_stream_config
) -> None:
    import dataclasses

    from ekko.store.holding import row_bytes

    budget = 300 * row_bytes(small_model_config.embedding_dim)  # of 26 x 20 rows
    cfg = dataclasses.replace(
        small_model_config,
        dynamic=DynamicEmbeddingConfig(row_budget=20, eviction=EvictionConfig(kind="lfu")),
        memory_budget_bytes=budget,
    )
    svc = TrainingService("ctr", cfg, MemorySink())
    for _, events in zip(range(3), SyntheticStream(small_stream_config).batches(64), strict=False):
        svc.trainer.step(events)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in train_metrics({svc.name: svc})()
        for s in fam.samples
    }
    st = svc.statistics()
    assert st.memory_budget is not None
    for kind, want in (("used", st.memory_budget.used_bytes), ("budget", budget)):
        got = samples[("ekko_train_embedding_memory_bytes", (("kind", kind), ("model", "ctr")))]
        assert got == want
    assert 0 < st.memory_budget.used_bytes <= budget
    totals = dict.fromkeys(("row_budget", "node_memory", "ttl"), 0.0)
    for table, t in st.dynamic_tables.items():
        for reason in totals:
            labels = (("model", "ctr"), ("reason", reason), ("table", table))
            got = samples[("ekko_train_embedding_evicted_by_reason_total", labels)]
            assert got == t.evicted_by[reason]
            totals[reason] += got
    assert totals["node_memory"] > 0 and totals["ttl"] == 0
