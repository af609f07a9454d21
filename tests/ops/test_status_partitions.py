"""``ekko status`` in a partitioned cluster (issue 17): each node's partitions, and for a
replica how many versions it lacks of each; a node that does not answer still shows what it
holds by config."""

from __future__ import annotations

from ekko.node.config import ClusterConfig
from ekko.ops.cluster_init import cluster_doc
from ekko.ops.status import node_row


def _status(role: str, partitions: list[int], lags: dict | None = None) -> dict:
    doc = {"role": role, "dc": "dc1", "partitions": partitions, "tables": {}, "links": {}}
    if lags is not None:
        doc["replica_lag"] = {"tables": {}, "partitions": lags}
    return doc


def test_rows_name_each_partition_and_its_lag():
    cfg = ClusterConfig.model_validate(cluster_doc(dcs=1, replicas=1, partitions=2))
    lag = {"1": {"upstream": "source-p1", "versions_behind": 12}}
    row = node_row(cfg, "dc1-p1-r0", {}, _status("leader", [1], lag), 1.0)
    assert row.partitions == "1 (lag 12)"
    assert node_row(cfg, "source-p0", {}, _status("source", [0]), 1.0).partitions == "0"
    down = node_row(cfg, "dc1-p1-r0", "x", "unreachable (ConnectError: refused)", 1.0)
    assert down.partitions == "1" and down.state == "unreachable"


def test_one_partition_shows_all():
    cfg = ClusterConfig.model_validate(cluster_doc(dcs=1, replicas=1))
    assert node_row(cfg, "dc1-r0", {}, _status("leader", [0], {}), 1.0).partitions == "all"
    assert node_row(cfg, "dc1-r0", "x", "unreachable", 1.0).partitions == "all"
