"""Serving nodes of a 2-partition cluster predict by scatter-gather (issue 17), real processes:
each holds one partition and reads the other's rows from that partition's holders in its DC.
Predictions equal a single full copy's bit for bit at both serving nodes; after ``kill -9`` of
partition 1's first holder, partition 1 fails over to its second holder (predicts still
answered, the retry counted in ``/metrics``); with both dead, a 503 names partition 1."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from cluster_checks import digests, until

from ekko.bench.scale_cluster import partitioned_doc, publish, reference, write_configs
from ekko.node.config import ModelConfig
from ekko.ops.launcher import LocalCluster
from ekko.serve.replica import ReplicaModel

pytestmark = pytest.mark.integration

MODEL = ModelConfig(name="ctr", rows_per_table=300, embedding_dim=4, num_sparse=4)


def _ctr(cluster: LocalCluster, node: str, body: dict) -> np.ndarray:
    r = cluster.post(node, "/v1/models/ctr/predict", body)
    assert r.status_code == 200, (node, r.text)
    return np.array([p["ctr"] for p in r.json()["predictions"]], dtype=np.float32)


def _retries(cluster: LocalCluster, node: str, partition: int) -> float:
    text = cluster.http.client(auth=cluster.auth).get(cluster.url(node, "/metrics")).text
    m = re.search(rf'ekko_scatter_retries_total{{node="{node}",partition="{partition}"}} (\S+)',
                  text)  # fmt: skip
    assert m, f"no ekko_scatter_retries_total of partition {partition} at {node}"
    return float(m.group(1))


def test_serving_nodes_scatter_fail_over_and_name_a_dead_partition(tmp_path: Path) -> None:
    doc = partitioned_doc(MODEL, partitions=2, dcs=1, replicas=2, shards=4, wan_delay_ms=[2],
                          sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "dc1-p0-r1"]
    path, node_configs = write_configs(doc, MODEL, tmp_path)
    with LocalCluster(path, node_configs=node_configs) as cluster:
        cluster.start(timeout=120)
        mc = publish(cluster, MODEL, seed=5)
        holders = {"dc1-p0-r0": "source-p0", "dc1-p1-r0": "source-p1", "dc1-p1-r1": "source-p1"}

        def synced() -> bool:
            return all(digests(cluster, n) == digests(cluster, s) for n, s in holders.items())

        until("every holder equal to its partition's source", synced, 30.0)
        rng = np.random.default_rng(1)
        dense = rng.random((32, 13)).astype(np.float32)
        sparse = rng.integers(0, 10**6, (32, MODEL.num_sparse))
        body = {"dense": dense.tolist(), "sparse": sparse.tolist()}
        want = ReplicaModel(reference(mc), MODEL.dlrm(), "reference").predict(dense, sparse)
        for node in ("dc1-p0-r0", "dc1-p1-r0"):  # p1 remote from one, local at the other
            np.testing.assert_array_equal(_ctr(cluster, node, body), want)
        assert _retries(cluster, "dc1-p0-r0", 1) == 0
        cluster.kill("dc1-p1-r0")
        np.testing.assert_array_equal(_ctr(cluster, "dc1-p0-r0", body), want)
        assert _retries(cluster, "dc1-p0-r0", 1) >= 1
        cluster.kill("dc1-p1-r1")
        r = cluster.post("dc1-p0-r0", "/v1/models/ctr/predict", body)
        assert r.status_code == 503, r.text
        assert "partition 1 has no live holder" in r.json()["error"], r.text
