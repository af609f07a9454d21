"""Cluster config: validated in one place, errors name the field; topology derived from it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ekko.node.config import ClusterConfig, ConfigError, SchedulerSection, load_config
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.schedule import SchedulerConfig


def _doc(**kw):
    return cluster_doc(dcs=3, replicas=2, wan_delay_ms=[25, 50, 100], **kw)


def test_generated_cluster_roundtrips_and_has_roles(tmp_path: Path):
    path = write_cluster(_doc(wan_mbit=100), tmp_path / "cluster.toml")
    cfg = load_config(path)
    assert (tmp_path / "cluster.secret").stat().st_mode & 0o777 == 0o600
    assert cfg.source.name == "source"
    assert [cfg.role(n) for n in ("source", "dc1-r0", "dc1-r1")] == ["source", "leader", "follower"]
    ports = [p for n in cfg.nodes for p in (n.sync_port, n.admin_port)]
    assert len(set(ports)) == len(ports)


def test_upstreams_failover_order_and_wan_profiles():
    cfg = ClusterConfig.model_validate(_doc(wan_mbit=100))
    assert [n.name for n in cfg.upstreams("dc1-r0")] == ["source"]
    assert [n.name for n in cfg.upstreams("dc1-r1")] == ["dc1-r0", "source"]
    assert cfg.upstreams("source") == []
    assert cfg.wan("dc3-r0", "source").delay_ms == 100
    assert cfg.wan("dc1-r0", "dc3-r1").delay_ms == 125
    assert cfg.wan("dc1-r0", "dc1-r1") is None
    no_leader = ClusterConfig.model_validate(_doc(sync={"use_dc_leader": False}))
    assert [n.name for n in no_leader.upstreams("dc1-r1")] == ["source"]


def test_relay_tree_pulls_from_other_dc_leader():
    doc = _doc()
    doc["dcs"][3]["upstream_dc"] = "dc1"
    cfg = ClusterConfig.model_validate(doc)
    assert [n.name for n in cfg.upstreams("dc3-r0")] == ["dc1-r0", "dc1-r1", "source"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["nodes"][1].update(dc="mars"), "unknown DC 'mars'"),
        (lambda d: d["nodes"].append(dict(d["nodes"][1])), "duplicate names"),
        (lambda d: d["dcs"][1].update(training=True), "exactly one DC"),
        (lambda d: d["tables"][0].update(dim=0), "tables.0.dim"),
        (lambda d: d["sync"].update(windw=3), "windw"),
        (lambda d: d["sync"].update(wan_codec="int3"), "sync.wan_codec"),
        (lambda d: d.update(scheduler={"percentile": 1.5}), "scheduler.percentile"),
        (
            lambda d: d.update(scheduler={"max_staleness_s": float("inf")}),
            "scheduler.max_staleness_s",
        ),
        (
            lambda d: d.update(scheduler={"significance_scope": "dc"}),
            "scheduler.significance_scope",
        ),
        (lambda d: d.update(scheduler={"release_lane": 7}), "scheduler.release_lane"),
        # values that passed and then failed at start (a torch or numpy traceback) or
        # silently stopped a link: inf bandwidth, a negative seed, layer widths <= 0
        (lambda d: d.update(scheduler={"seed": -1}), "scheduler.seed"),
        (lambda d: d["dcs"][1].update(wan_mbit=float("inf")), "dcs.1.wan_mbit"),
        (lambda d: d["dcs"][1].update(wan_delay_ms=float("inf")), "dcs.1.wan_delay_ms"),
        (lambda d: d.update(guard={"interval_s": float("inf")}), "guard.interval_s"),
        # the detector's rules, checked when the config is read (a drift allowance at or
        # above the detector's z clip passed here and then stopped the node at start)
        (lambda d: d.update(guard={"drift_allowance": 6.0}), "> drift_allowance"),
        (lambda d: d.update(guard={"drift_allowance": -1.0}), "guard.drift_allowance"),
        (lambda d: d.update(guard={"corrupted_threshold": 7.0}), "guard.corrupted_threshold"),
        (lambda d: d.update(guard={"warmup_intervals": 2}), "guard.warmup_intervals"),
        (lambda d: d.update(guard={"min_samples": 0}), "guard.min_samples"),
        (lambda d: d.update(guard={"floor_z": 0.0}), "guard.floor_z"),
        (lambda d: d["sync"].update(connect_timeout_s=float("inf")), "sync.connect_timeout_s"),
        (
            lambda d: d["sync"].update(tombstone_horizon_s=5.0, tombstone_report_s=5.0),
            "tombstone_horizon_s: 5.0 s must exceed tombstone_report_s + wait_ms (6 s)",
        ),
        (lambda d: d["sync"].update(tombstone_purge_s=-1), "sync.tombstone_purge_s"),
        (lambda d: d.update(models=[{"name": "a", "top_mlp": [-1, 32, 1]}]), "models.0.top_mlp"),
        (lambda d: d.update(models=[{"name": "a", "top_mlp": [0, 1]}]), "models.0.top_mlp"),
        (
            lambda d: d.update(models=[{"name": "a", "bottom_mlp": [0, 16]}]),
            "models.0.bottom_mlp",
        ),
        (lambda d: d.update(models=[{"name": "a", "sparse_lr": float("inf")}]), "sparse_lr"),
        (
            lambda d: (
                d["dcs"][1].update(upstream_dc="dc2") or d["dcs"][2].update(upstream_dc="dc1")
            ),
            "relay cycle",
        ),
        (
            lambda d: d.update(
                models=[
                    {"name": "a", "table_namespace": "x/"},
                    {"name": "b", "table_namespace": "x/"},
                ]
            ),
            "models ['a', 'b'] would write the same store tables (namespace 'x/')",
        ),
        (
            lambda d: d.update(models=[{"name": "a", "table_namespace": "a"}]),
            "models.0.table_namespace",
        ),
    ],
)
def test_bad_configs_name_the_problem(tmp_path: Path, mutate, needle):
    doc = _doc()
    mutate(doc)
    path = tmp_path / "bad.toml"
    import tomli_w

    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_unparseable_and_missing_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cluster\nname=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_codec_per_link_kind_and_scheduler_from_config():
    doc = _doc(sync={"wan_codec": "int8", "pace_wan": True})
    doc["scheduler"] = {"enabled": True}
    cfg = ClusterConfig.model_validate(doc)
    assert cfg.sync.wan_codec == "int8" and cfg.sync.lan_codec is None
    sched = cfg.scheduler.scheduler()
    assert sched is not None and sched.config.percentile == 0.9
    assert ClusterConfig.model_validate(_doc()).scheduler.scheduler() is None


def test_the_scheduler_section_is_the_schedulers_own_config_checked_once():
    """``[scheduler]`` validates into ``SchedulerConfig`` itself: ``build`` hands it over as
    it is (no copy to check again), with every field the library has."""
    doc = _doc()
    doc["scheduler"] = {"enabled": True, "percentile": 0.75, "defer": True, "seed": 3}
    section = ClusterConfig.model_validate(doc).scheduler
    built = section.build()
    assert isinstance(built, SchedulerConfig) and built is section
    assert (built.percentile, built.defer, built.seed) == (0.75, True, 3)
    assert SchedulerConfig().enabled and not SchedulerSection().enabled  # off unless asked
    assert SchedulerSection().build() is None


def test_a_served_model_gets_the_shape_share_and_listing_of_its_config():
    cfg = ClusterConfig.model_validate(
        _doc() | {"models": [{"name": "ctr", "baseline_share": 0.01}]}
    )
    served = cfg.models[0].served()
    assert served.name == "ctr" and served.baseline_share == 0.01
    assert served.dlrm == cfg.models[0].dlrm()
    assert served.listing == cfg.models[0].model_dump()  # what GET /v1/models showed before


def test_several_models_get_tables_of_their_own():
    one = ClusterConfig.model_validate(_doc() | {"models": [{"name": "ctr"}]})
    assert one.models[0].dlrm().table_namespace == ""  # a lone model keeps the plain names
    doc = _doc() | {"models": [{"name": "ctr"}, {"name": "ads", "table_namespace": "m2/"}]}
    two = ClusterConfig.model_validate(doc)
    assert [m.dlrm().table_namespace for m in two.models] == ["ctr/", "m2/"]


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"admission": {"kind": "count", "seed": -1}}, "models.0.admission.seed"),
        ({"admission": {"seed": 1 << 64}}, "models.0.admission.seed"),
        ({"eviction": {"ttl_s": 1e300}}, "models.0.eviction.ttl_s"),
    ],
)
def test_a_dynamic_table_value_its_trainer_refuses_is_refused_where_the_config_is_read(
    tmp_path: Path, section: dict, needle: str
) -> None:
    """seed = -1 passed the config and the source crashed starting its trainer (an
    OverflowError from the count-min sketch's salts); ttl_s = 1e300 passed and raised in
    ``ModelConfig.dlrm()``, on every node serving the model."""
    import tomli_w

    doc = _doc()
    doc["models"] = [{"name": "ctr", "row_budget": 9, **section}]
    path = tmp_path / "cluster.toml"
    path.write_text(tomli_w.dumps(doc))
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(path)


def test_the_largest_seed_and_ttl_the_config_takes_build_the_trainers_policies() -> None:
    from ekko.node.config import AdmissionSection, EvictionSection
    from ekko.train.admission import Admission, AdmissionConfig
    from ekko.train.eviction import EvictionConfig

    admission = AdmissionSection(kind="count", seed=(1 << 64) - 1, sketch_width=8)
    Admission(AdmissionConfig(**admission.model_dump()))
    EvictionConfig(**EvictionSection(kind="ttl", ttl_s=0.999e18).model_dump())
