"""Inference traffic, counted where predictions are served, reaches the source's scheduler
(p_m) on pull requests, through the DC leader."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np

from ekko.node.cluster_init import cluster_doc, write_cluster
from ekko.node.launcher import LocalCluster

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 1.0}


def _predict(cluster: LocalCluster, node: str, events: int, rng: np.random.Generator) -> None:
    body = {
        "dense": rng.random((events, 13)).round(3).tolist(),
        "sparse": rng.integers(0, 1000, (events, 26)).tolist(),
    }
    end = time.monotonic() + 60
    while True:  # 503 until the replica holds the model's dense tensors
        r = cluster.post(node, "/v1/models/ctr/predict", body)
        if r.status_code == 200 or time.monotonic() > end:
            break
        time.sleep(0.2)  # another process is syncing; bounded by the deadline
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == events


def _reported(cluster: LocalCluster, node: str, want: dict, deadline_s: float = 30.0) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        traffic = cluster.get(node, "/v1/status")["traffic"]
        if traffic["reported"] == want or time.monotonic() > end:
            return traffic
        time.sleep(0.2)  # reports ride on the next pulls; bounded by the deadline


def test_predictions_are_reported_to_the_source_through_the_leader(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=2, serve=True, models=[MODEL],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["scheduler"] = {"enabled": True, "hot_keys": True, "accumulate_drift": True}
    rng = np.random.default_rng(0)
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=120)
        _predict(cluster, "dc1-r1", 30, rng)  # the follower: its report goes via the leader
        _predict(cluster, "dc1-r0", 20, rng)
        leader = _reported(cluster, "dc1-r0", {"ctr": 30})
        assert leader["reported"] == {"ctr": 30}
        source = _reported(cluster, "source", {"ctr": 50})
        assert source["reported"] == {"ctr": 50}
        # Every table of the model is registered to it: the model holds all the traffic.
        assert source["shares"] == {"ctr": 1.0}
        metrics = httpx.get(cluster.url("source", "/metrics"), timeout=10).text
        (line,) = [m for m in metrics.splitlines() if m.startswith("ekko_traffic_reported_total")]
        assert 'model="ctr"' in line and line.endswith(" 50.0"), line
