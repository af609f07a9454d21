"""A model with dynamic tables trained at a real source (issue 18): every table stays within
its row budget at the source and at the replica (the trainer's evictions are deletes that sync
like rows), the replica holds the source's tables, and it serves raw ids."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from cluster_checks import until, wait_converged

from ekko.train.streams import StreamConfig, SyntheticStream

pytestmark = pytest.mark.integration

BUDGET = 64
MODEL = {
    "name": "ctr",
    "embedding_dim": 4,
    "dense_interval_s": 0.0,
    "row_budget": BUDGET,
    "admission": {"kind": "count", "threshold": 2, "sketch_width": 4096},
    "eviction": {"kind": "lru"},
}
STREAM = StreamConfig(seed=11, max_vocab=3_000, initial_items=500, new_items_per_s=200.0)
BATCHES = 40


def _body(batch, labels: bool = True) -> dict:
    doc = {"dense": batch.dense.tolist(), "sparse": batch.sparse.tolist()}
    if labels:
        doc["labels"] = batch.labels.astype(int).tolist()
    return doc


def _emb_tables(cluster, node: str) -> dict[str, dict]:
    tables = cluster.get(node, "/v1/status")["tables"]
    return {name: t for name, t in tables.items() if name.startswith("emb_")}


def test_dynamic_tables_stay_within_budget_at_source_and_replica(make_cluster) -> None:
    cluster = make_cluster(dcs=1, replicas=1, serve=True, models=[MODEL])
    cluster.start(timeout=120)
    batches = SyntheticStream(STREAM).batches(128)
    url = cluster.url("source", "/v1/models/ctr/train")
    with httpx.Client(timeout=10.0, auth=cluster.auth) as client:
        for _ in range(BATCHES):
            body = _body(next(batches))  # a busy trainer (503) takes it again later
            until("the trainer takes a batch", lambda b=body: client.post(url, json=b).is_success)
    report = until(
        "every batch trained",
        lambda: (
            (rep := cluster.get("source", "/v1/models/ctr/train"))["batches"] >= BATCHES and rep
        ),
    )
    assert report["failed"] is None
    dyn = report["dynamic_tables"]
    assert sum(t["evicted"] for t in dyn.values()) > 0
    assert all(t["rows"] <= BUDGET for t in dyn.values())

    got = wait_converged(cluster)
    assert all(d == got["source"] for d in got.values()), got
    replica = next(n.name for n in cluster.config.nodes if n.name != "source")
    for node in ("source", replica):
        rows = {name: t["rows"] for name, t in _emb_tables(cluster, node).items()}
        assert rows and max(rows.values()) <= BUDGET, (node, rows)

    held_out = next(batches)
    r = cluster.post(replica, "/v1/models/ctr/predict", _body(held_out, labels=False))
    assert r.status_code == 200, r.text
    ctrs = np.asarray([p["ctr"] for p in r.json()["predictions"]])
    assert all(math.isfinite(c) for c in ctrs) and ctrs.std() > 0
