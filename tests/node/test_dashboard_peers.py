"""A source's dashboard reads the latency of the nodes holding its partitions only: in a
partitioned cluster every source read every node once a second, a request per source a
second at each holder, on the loop that answers its lookups."""

from __future__ import annotations

from pathlib import Path

from ekko.bench.scale_cluster import partitioned_doc, write_configs
from ekko.node.config import ModelConfig, load_config
from ekko.node.dashboard import latency_peers
from ekko.ops.cluster_init import cluster_doc, write_cluster

MODEL = ModelConfig(name="ctr", rows_per_table=100, embedding_dim=4, num_sparse=2)


def test_a_partition_source_reads_its_partitions_holders(tmp_path: Path) -> None:
    doc = partitioned_doc(MODEL, partitions=4, dcs=2, replicas=1, shards=4)
    doc["nodes"].append({"name": "dc1-all", "dc": "dc1", "sync_port": 1, "admin_port": 2,
                         "partitions": [0, 1, 2, 3]})  # fmt: skip
    path, _ = write_configs(doc, MODEL, tmp_path)
    cfg = load_config(path)
    assert latency_peers(cfg, "source-p1") == ["dc1-p1-r0", "dc2-p1-r0", "dc1-all"]
    assert latency_peers(cfg, "source-p3") == ["dc1-p3-r0", "dc2-p3-r0", "dc1-all"]


def test_a_single_partition_source_reads_every_replica(tmp_path: Path) -> None:
    cfg = load_config(write_cluster(cluster_doc(dcs=2, replicas=2), tmp_path / "c.toml"))
    assert latency_peers(cfg, "source") == ["dc1-r0", "dc1-r1", "dc2-r0", "dc2-r1"]
