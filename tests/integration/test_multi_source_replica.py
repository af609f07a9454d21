"""A replica holding partitions of two sources, over real processes (issue 17): the training
DC's source-p0 holds partition 0 and source-p1 partition 1; one inference-DC replica holds
both. Writes to both converge (the replica's digest of each partition equals its source's);
kill -9 of source-p1 and a restart without its data (a new lineage) makes the replica
rebuild partition 1 only — partition 0's rows and versions, and its lineage, unchanged —
and a replica killed and restarted on its data dir comes back with both."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from cluster_checks import until

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.store import shard_of

pytestmark = pytest.mark.integration

DIM, SHARDS = 8, 8
REPLICA = "dc1-r0"


def _doc() -> dict:
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, wan_delay_ms=[5],
                      tables=[("emb", DIM, SHARDS)], sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["nodes"] = [n for n in doc["nodes"] if n["name"] != "dc1-p1-r0"]
    replica = next(n for n in doc["nodes"] if n["name"] == "dc1-p0-r0")
    replica.update(name=REPLICA, partitions=[0, 1])
    return doc


def _partition(cluster: LocalCluster, name: str, p: int) -> str:
    """``name``'s digest of partition ``p``'s rows (keys, versions, values)."""
    st = cluster.get(name, "/v1/status")
    return st["tables"]["emb"]["partition_digests"][str(p)] if st["tables"] else ""


def _write(cluster: LocalCluster, rng: np.random.Generator, p: int, n: int) -> None:
    keys = np.unique(rng.integers(0, 1 << 40, 4 * n))
    parts = cluster.config.placement().partitions_of("emb", SHARDS)[shard_of(keys, SHARDS)]
    keys = keys[parts == p][:n]
    body = {"keys": keys.tolist(), "values": rng.standard_normal((keys.size, DIM)).round(3)
            .tolist()}  # fmt: skip
    r = cluster.post(f"source-p{p}", "/v1/tables/emb/rows", body)
    assert r.status_code == 200, r.text


def _converged(cluster: LocalCluster) -> bool:
    return all(
        _partition(cluster, REPLICA, p) == _partition(cluster, f"source-p{p}", p) != ""
        for p in (0, 1)
    )


def test_a_replica_of_two_sources_rebuilds_only_the_partition_whose_source_lost_its_data(
    tmp_path: Path,
):
    with LocalCluster(write_cluster(_doc(), tmp_path / "cluster.toml")) as cluster:
        cluster.start()
        rng = np.random.default_rng(5)
        for _ in range(2):
            for p in (0, 1):
                _write(cluster, rng, p, 400)
        until("the replica's partitions equal their sources'", lambda: _converged(cluster), 15)
        before = cluster.get(REPLICA, "/v1/status")
        assert before["partitions"] == [0, 1] and before["rebuilds"] == 0
        lineages = before["lineages"]
        assert lineages["0"] != lineages["1"]  # two histories in one store
        p0 = _partition(cluster, REPLICA, 0)

        cluster.kill("source-p1")
        data = cluster.config.path(cluster.config.cluster.data_dir, cluster.base_dir)
        shutil.rmtree(data / "source-p1")
        cluster.restart("source-p1")  # recovers what the replica holds of p1, new lineage
        _write(cluster, rng, 1, 300)
        until("the replica rebuilt partition 1 from source-p1's new history",
              lambda: _converged(cluster), 15)  # fmt: skip
        after = cluster.get(REPLICA, "/v1/status")
        assert after["rebuilds"] == 1
        assert after["lineages"]["0"] == lineages["0"] != after["lineages"]["1"]
        assert after["lineages"]["1"] != lineages["1"]
        assert _partition(cluster, REPLICA, 0) == p0  # partition 0: same rows and versions
        lag = after["replica_lag"]["partitions"]
        assert {p: lag[p]["upstream"] for p in lag} == {"0": "source-p0", "1": "source-p1"}

        cluster.kill(REPLICA)  # restarted on its data dir: both partitions come back
        cluster.restart(REPLICA)
        until("the restarted replica holds both partitions", lambda: _converged(cluster), 15)
        assert _partition(cluster, REPLICA, 0) == p0
