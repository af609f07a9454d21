"""A 2-partition cluster of real node processes (issue 17): each partition's writes go to its
own source and reach exactly that partition's holders in both inference DCs — the leader
over the WAN, the other holder from that leader — and every holder's digests equal its
partition source's; a write to the wrong source is refused naming the partition; with the
leader of a partition killed, its follower fails over to that partition's source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cluster_checks import digests, until

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.store import shard_of

pytestmark = pytest.mark.integration

DIM = 8


def test_writes_to_two_partition_sources_reach_their_holders_in_two_dcs(tmp_path: Path):
    doc = cluster_doc(dcs=2, replicas=2, partitions=2, wan_delay_ms=[5, 10],
                      tables=[("emb", DIM, 8)], max_memory_mb=64,
                      sync={"snapshot_interval_s": 0, "failover_probe_s": 0.5})  # fmt: skip
    doc["nodes"] = [n for n in doc["nodes"] if not n["name"].startswith("dc2-") or
                    n["name"].endswith("-r0")]  # fmt: skip
    holders = {p: [n["name"] for n in doc["nodes"] if n.get("partitions") == [p]] for p in (0, 1)}
    assert holders[1] == ["source-p1", "dc1-p1-r0", "dc1-p1-r1", "dc2-p1-r0"]
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start()
        placement = cluster.config.placement()
        rng = np.random.default_rng(3)
        keys = np.unique(rng.integers(0, 1 << 40, 6000))
        part = placement.partitions_of("emb", 8)[shard_of(keys, 8)]
        for p in (0, 1):
            mine = keys[part == p]
            for batch in np.array_split(mine, 3):
                body = {"keys": batch.tolist(), "values": rng.standard_normal(
                    (batch.size, DIM)).round(3).tolist()}  # fmt: skip
                r = cluster.post(f"source-p{p}", "/v1/tables/emb/rows", body)
                assert r.status_code == 200, r.text
        r = cluster.post("source-p0", "/v1/tables/emb/rows",
                         {"keys": [int(keys[part == 1][0])], "values": [[0.0] * DIM]})  # fmt: skip
        assert r.status_code == 421 and "its source is source-p1" in r.text

        def converged() -> bool:
            return all(
                digests(cluster, n) == digests(cluster, holders[p][0])
                for p in (0, 1)
                for n in holders[p][1:]
            )

        until("every holder's digest equal to its partition source's", converged, 30.0)
        for p in (0, 1):
            rows = int((part == p).sum())
            for n in holders[p]:
                st = cluster.get(n, "/v1/status")
                assert st["partitions"] == [p] and st["tables"]["emb"]["rows"] == rows, n
        assert digests(cluster, "source-p0") != digests(cluster, "source-p1")
        # The leader pulls its partition over the WAN from its source, the other holder
        # from the leader; each says how far behind its partition is.
        assert cluster.get("dc1-p1-r1", "/v1/status")["upstream"] == "dc1-p1-r0"
        assert cluster.get("dc1-p1-r0", "/v1/status")["upstream"] == "source-p1"

        def lag_zero() -> bool:
            lag = cluster.get("dc2-p0-r0", "/v1/status")["replica_lag"]["partitions"]
            return lag == {"0": {"upstream": "source-p0", "versions_behind": 0}}

        until("dc2-p0-r0's partition 0 caught up in its status", lag_zero, 10.0)
        # kill -9 of partition 1's leader in dc1: its follower fails over to the partition's
        # source over the WAN and gets what was written since.
        cluster.kill("dc1-p1-r0")
        more = rng.integers(0, 1 << 40, 3000)
        more = more[placement.partitions_of("emb", 8)[shard_of(more, 8)] == 1]
        body = {"keys": more.tolist(), "values": [[1.0] * DIM] * more.size}
        assert cluster.post("source-p1", "/v1/tables/emb/rows", body).status_code == 200
        until(
            "dc1-p1-r1 failed over and caught up with source-p1",
            lambda: digests(cluster, "dc1-p1-r1") == digests(cluster, "source-p1"),
            20.0,
        )
        assert cluster.get("dc1-p1-r1", "/v1/status")["upstream"] == "source-p1"
