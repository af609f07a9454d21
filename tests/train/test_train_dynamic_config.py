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
            "eviction": {"kind": "ttl", "ttl_s": 600.0},
        },
    )
    assert m.dlrm().dynamic == DynamicEmbeddingConfig(
        row_budget=5000,
        admission=AdmissionConfig(kind="count", threshold=3, sketch_width=4096, idle_rows=True),
        eviction=EvictionConfig(kind="ttl", ttl_s=600.0),
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
