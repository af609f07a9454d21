"""Partitioned clusters (issue 17): which node holds, sources and leads each partition, and
the configs that cannot run, refused by name when read."""

from __future__ import annotations

import pytest

from ekko.node import config_partitions
from ekko.node.config import ClusterConfig
from ekko.node.upstream import upstream_groups
from ekko.ops.cluster_init import cluster_doc


def _doc(partitions: int = 2, **kw):
    return cluster_doc(dcs=2, replicas=2, wan_delay_ms=[25, 50], partitions=partitions, **kw)


def _node(doc, name):
    return next(n for n in doc["nodes"] if n["name"] == name)


def test_one_partition_is_todays_cluster():
    cfg = ClusterConfig.model_validate(cluster_doc(dcs=2, replicas=2))
    assert cfg.cluster.partitions == 1 and not cfg.partitioned
    assert [n.name for n in cfg.sources] == ["source"]
    assert all(cfg.held(n.name) == (0,) for n in cfg.nodes)
    assert [n.name for n in cfg.upstreams("dc1-r1")] == ["dc1-r0", "source"]


def test_each_partition_has_a_source_a_leader_per_dc_and_its_own_upstreams():
    cfg = ClusterConfig.model_validate(_doc(max_memory_mb=64))
    assert [n.name for n in cfg.sources] == ["source-p0", "source-p1"]
    assert cfg.source_of(1).name == "source-p1" and cfg.source.name == "source-p0"
    assert cfg.node("dc2-p1-r0").max_memory_mb == 64
    roles = {n.name: cfg.role(n.name) for n in cfg.nodes}
    assert roles["source-p1"] == "source"
    assert roles["dc1-p1-r0"] == "leader" and roles["dc1-p1-r1"] == "follower"
    assert [n.name for n in cfg.upstreams("dc1-p1-r0")] == ["source-p1"]
    assert [n.name for n in cfg.upstreams("dc2-p1-r1")] == ["dc2-p1-r0", "source-p1"]
    assert cfg.placement().partitions == 2


def test_a_node_holding_partitions_of_one_source_pulls_each_from_its_leader():
    doc = _doc()
    # One source of both partitions; dc1-p0-r1 holds both: it follows dc1-p0-r0 for p0 and,
    # listed before dc1-p1-r0, leads p1.
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "source-p1"]
    _node(doc, "source-p0")["partitions"] = [0, 1]
    _node(doc, "dc1-p0-r1")["partitions"] = [1, 0]
    cfg = ClusterConfig.model_validate(doc)
    assert cfg.held("dc1-p0-r1") == (0, 1) and cfg.role("dc1-p0-r1") == "leader"
    assert [n.name for n in cfg.upstreams("dc1-p0-r1", 0)] == ["dc1-p0-r0", "source-p0"]
    assert [n.name for n in cfg.upstreams("dc1-p0-r1", 1)] == ["source-p0"]
    assert [n.name for n in cfg.upstreams("dc1-p1-r0", 1)] == ["dc1-p0-r1", "source-p0"]
    assert cfg.role("dc1-p1-r0") == "follower"


def test_a_replica_may_hold_partitions_of_two_sources_and_pulls_each_over_its_own_link():
    """Issue 17: each partition has its source; a replica holding p0 (source-p0) and p1
    (source-p1) keeps a history per source and pulls each source's partitions on a link of
    their own — even from one leader holding both, a link per source."""
    doc = _doc()
    _node(doc, "dc1-p0-r0")["partitions"] = [0, 1]  # the leader of both in dc1
    _node(doc, "dc1-p0-r1")["partitions"] = [1, 0]
    cfg = ClusterConfig.model_validate(doc)
    assert config_partitions.source_groups(cfg, cfg.node("dc1-p0-r1")) == [(0,), (1,)]
    assert [n.name for n in cfg.upstreams("dc1-p0-r0", 1)] == ["source-p1"]
    assert [n.name for n in cfg.upstreams("dc1-p0-r1", 0)] == ["dc1-p0-r0", "source-p0"]
    assert [n.name for n in cfg.upstreams("dc1-p0-r1", 1)] == ["dc1-p0-r0", "source-p1"]
    assert upstream_groups(cfg, "dc1-p0-r1") == [(0,), (1,)]
    # A source still holds only the partitions it is the source of.
    _node(doc, "source-p1")["partitions"] = [1, 0]
    with pytest.raises(ValueError, match="a source holds only partitions it is the source of"):
        ClusterConfig.model_validate(doc)


def test_a_node_pulls_over_one_link_per_group_of_partitions_sharing_upstreams():
    doc = _doc()
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "source-p1"]
    _node(doc, "source-p0")["partitions"] = [0, 1]
    _node(doc, "dc1-p0-r1")["partitions"] = [0, 1]  # follows p0, leads p1: two links
    _node(doc, "dc2-p0-r0")["partitions"] = [0, 1]  # leads both from one source: one link
    cfg = ClusterConfig.model_validate(doc)
    assert upstream_groups(cfg, "dc1-p0-r1") == [(0,), (1,)]
    assert upstream_groups(cfg, "dc2-p0-r0") == [(0, 1)]
    assert upstream_groups(ClusterConfig.model_validate(_doc()), "dc2-p1-r1") == [(1,)]


def _drop(doc, names):
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] not in names]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d["cluster"].update(partitions=0), "cluster.partitions"),
        (
            lambda d: _node(d, "dc1-p1-r1").update(partitions=[2]),
            "nodes[dc1-p1-r1].partitions: 2 is not a partition; cluster.partitions = 2",
        ),
        (lambda d: _node(d, "dc1-p1-r1").update(partitions=[-1]), "-1 is not a partition"),
        (
            lambda d: _node(d, "dc1-p1-r1").update(partitions=[]),
            "nodes[dc1-p1-r1].partitions: empty",
        ),
        (
            lambda d: _node(d, "dc1-p1-r1").update(partitions=[1, 1]),
            "nodes[dc1-p1-r1].partitions: repeated ids",
        ),
        (
            lambda d: _drop(d, {"dc2-p1-r0", "dc2-p1-r1"}),
            "dcs[dc2]: no syncing node holds partition 1",
        ),
        (
            lambda d: _drop(d, {"source-p1"}),
            "dcs[train]: no syncing node holds partition 1",
        ),
        (
            lambda d: _node(d, "source-p1").update(partitions=[1, 0]),
            "nodes[source-p1].partitions: it is the source of partition 1",
        ),
        (
            lambda d: d["nodes"].append(
                dict(_node(d, "dc1-p0-r1"), name="ck", refresh="checkpoint", partitions=[0])
            ),
            "nodes[ck].refresh: a checkpoint replica copies one source's store",
        ),
        (
            lambda d: (
                d.update(guard={"enabled": True}, models=[{"name": "ctr"}])
                or _node(d, "source-p1").update(serve=True)
            ),
            "nodes[source-p1].serve: a partition source does not serve a guarded model",
        ),
        (lambda d: _node(d, "dc1-p0-r0").update(max_memory_mb=0), "max_memory_mb"),
        (lambda d: _node(d, "dc1-p0-r0").update(max_memory_mb=float("nan")), "max_memory_mb"),
    ],
)
def test_partition_configs_that_cannot_run_are_refused_by_name(mutate, needle):
    doc = _doc()
    mutate(doc)
    with pytest.raises(ValueError) as err:
        ClusterConfig.model_validate(doc)
    assert needle in str(err.value)


def test_cluster_init_refuses_partitions_with_a_checkpoint_replica():
    with pytest.raises(ValueError, match="not with --partitions 2"):
        _doc(checkpoint_every_s=5.0)


def test_a_serving_source_is_fine_without_the_guard():
    doc = _doc()
    doc.update(models=[{"name": "ctr"}])
    _node(doc, "source-p1")["serve"] = True
    assert ClusterConfig.model_validate(doc).node("source-p1").serve


def test_the_guard_runs_on_a_partitioned_cluster(tmp_path):
    """It was refused (the guard's source half ran beside an in-node trainer): the source of
    partition 0 now coordinates every partition source's restore, each other source restores
    its own partitions on command, and every syncing non-source node is a holder."""
    from ekko.node.core import NodeCore
    from ekko.node.guard_sources import model_tables, topology
    from ekko.node.models import ModelHost

    doc = _doc()
    doc.update(guard={"enabled": True}, models=[{"name": "ctr"}])
    cfg = ClusterConfig.model_validate(doc)
    sources, holders = topology(cfg)
    assert sources == {"source-p0": (0,), "source-p1": (1,)}
    assert holders["dc1-p1-r0"] == (1,) and "source-p1" not in holders
    tables = model_tables(cfg.models[0])
    assert "emb_0" in tables and any(t.startswith("dense/") for t in tables)
    coord = ModelHost(NodeCore(cfg, "source-p0", tmp_path / "p0"))
    other = ModelHost(NodeCore(cfg, "source-p1", tmp_path / "p1"))
    guard = coord.source_guards["ctr"]
    assert guard.plan is not None and guard.plan.sources == {"source-p1": (1,)}
    assert guard.plan.holders == holders and guard.trainer is None
    assert other.source_guards == {} and other.guard_sources.restorers["ctr"].partitions == (1,)
    paths = {r.path for r in other.routes(1 << 20)}
    assert "/v1/models/{model}/guard/restore" in paths
    assert "/v1/models/{model}/rollback" in {r.path for r in coord.routes(1 << 20)}
