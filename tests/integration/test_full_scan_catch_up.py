"""Replicas catching up by full scan, across processes (DESIGN.md §3, Catch-up; issue 13 §1).

The source's scheduler spreads writes over every lane; with the update cache off, every pull
is answered by one pass over the table. The two-lane full-scan kernel took the source down
with a segfault as soon as two new replicas pulled (exit code -11).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

pytestmark = pytest.mark.integration

DIM = 8


def _write(cluster: LocalCluster, rng: np.random.Generator, batches: int) -> None:
    for _ in range(batches):
        keys = rng.integers(0, 40_000, 400).tolist()
        values = rng.standard_normal((400, DIM)).round(3).tolist()
        r = cluster.post("source", "/v1/tables/emb/rows", {"keys": keys, "values": values})
        assert r.status_code == 200, r.text


def _emb(cluster: LocalCluster, name: str) -> dict:
    return cluster.get(name, "/v1/status")["tables"]["emb"]


def test_new_replicas_catch_up_by_full_scan_in_every_lane(tmp_path: Path) -> None:
    doc = cluster_doc(
        dcs=1,
        replicas=2,
        wan_delay_ms=[5],
        tables=[("emb", DIM, 8)],
        sync={"use_cache": False, "cache_capacity": 4, "snapshot_interval_s": 0},
    )
    doc["scheduler"] = {"enabled": True}  # new keys, high and low priority: every lane
    config = write_cluster(doc, tmp_path / "cluster.toml")
    rng = np.random.default_rng(3)
    with LocalCluster(config) as cluster:
        cluster.start(["source"], timeout=120)
        _write(cluster, rng, 25)
        lanes = _emb(cluster, "source")["knowledge"]
        assert min(lanes["high"], lanes["low"], lanes["new"]) > 0, lanes
        replicas = ["dc1-r0", "dc1-r1"]  # a DC leader and its follower, both empty
        cluster.start(replicas, timeout=120)
        _write(cluster, rng, 5)
        end = time.monotonic() + 60
        while True:
            want = _emb(cluster, "source")
            got = {n: _emb(cluster, n) for n in replicas}
            same = all(
                (g["digest"], g["knowledge"]) == (want["digest"], want["knowledge"])
                for g in got.values()
            )
            if same or time.monotonic() > end:
                break
            time.sleep(0.25)  # other processes' state over HTTP; bounded by the deadline
        for name, g in got.items():
            assert g["rows"] == want["rows"], name
            assert (g["digest"], g["knowledge"]) == (want["digest"], want["knowledge"]), name
        assert all(cluster.procs[n].alive for n in ["source", *replicas])
        assert cluster.get("source", "/health")["ok"]
