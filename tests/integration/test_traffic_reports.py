"""Two models in one cluster: each in tables of its own, served by every replica; inference
traffic, counted where predictions are served, reaches the source's scheduler (p_m) on pull
requests, through the DC leader."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster

MODELS = [
    {"name": name, "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 1.0}
    for name in ("ctr", "ads")
]


def _predict(
    cluster: LocalCluster, node: str, model: str, events: int, rng: np.random.Generator
) -> None:
    body = {
        "dense": rng.random((events, 13)).round(3).tolist(),
        "sparse": rng.integers(0, 1000, (events, 26)).tolist(),
    }
    end = time.monotonic() + 60
    while True:  # 503 until the replica holds the model's dense tensors
        r = cluster.post(node, f"/v1/models/{model}/predict", body)
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


def test_two_models_keep_apart_and_their_traffic_reaches_the_source(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=2, serve=True, models=MODELS,
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["scheduler"] = {"enabled": True, "hot_keys": True, "accumulate_drift": True}
    rng = np.random.default_rng(0)
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=120)
        tables = cluster.get("source", "/v1/status")["tables"]
        for model in ("ctr", "ads"):
            assert f"{model}/emb_0" in tables and f"{model}/dense/top.0.weight" in tables
        assert not [t for t in tables if not t.startswith(("ctr/", "ads/"))]
        _predict(cluster, "dc1-r1", "ctr", 30, rng)  # the follower: reported via the leader
        _predict(cluster, "dc1-r0", "ctr", 20, rng)
        _predict(cluster, "dc1-r0", "ads", 50, rng)
        leader = _reported(cluster, "dc1-r0", {"ctr": 30})
        assert leader["reported"] == {"ctr": 30}
        source = _reported(cluster, "source", {"ctr": 50, "ads": 50})
        assert source["reported"] == {"ctr": 50, "ads": 50}
        # Each model's tables are registered to it: the two split the traffic (decayed
        # between reports a second or two apart, so not exactly in half).
        assert set(source["shares"]) == {"ctr", "ads"}
        assert source["shares"]["ctr"] == pytest.approx(0.5, abs=0.05)
        metrics = httpx.get(cluster.url("source", "/metrics"), timeout=10).text
        lines = [m for m in metrics.splitlines() if m.startswith("ekko_traffic_reported_total")]
        assert len(lines) == 2 and all(m.endswith(" 50.0") for m in lines), lines
