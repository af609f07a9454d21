"""A model with dynamic tables trained at a real source (issue 18): every table stays within
its row budget, and all of them within the model's memory budget, at the source and at the
replica (the trainer's evictions are deletes that sync like rows), the replica holds the
source's tables, and it serves raw ids."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
from cluster_checks import until, wait_converged

from ekko.store.holding import row_bytes
from ekko.train.streams import StreamConfig, SyntheticStream

pytestmark = pytest.mark.integration

BUDGET = 64
MEMORY_MB = 0.045  # 604 rows of 78 B (dim 4, as the store counts them) over 26 tables of 64
MEMORY = int(MEMORY_MB * (1 << 20))
MODEL = {
    "name": "ctr",
    "embedding_dim": 4,
    "dense_interval_s": 0.0,
    "row_budget": BUDGET,
    "memory_budget_mb": MEMORY_MB,
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
    distinct: set[tuple[int, int]] = set()
    with httpx.Client(timeout=10.0, auth=cluster.auth) as client:
        for _ in range(BATCHES):
            batch = next(batches)
            distinct |= {(f, int(i)) for f, col in enumerate(batch.sparse.T) for i in col}
            body = _body(batch)  # a busy trainer (503) takes it again later
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
    assert sum(t["evicted_by"]["node_memory"] for t in dyn.values()) > 0
    assert report["memory_budget"]["max_bytes"] == MEMORY
    assert report["memory_budget"]["used_bytes"] <= MEMORY
    assert len(distinct) > 10 * MEMORY // row_bytes(4)  # ids seen: > 10 x what fits

    got = wait_converged(cluster)
    assert all(d == got["source"] for d in got.values()), got
    replica = next(n.name for n in cluster.config.nodes if n.name != "source")
    for node in ("source", replica):
        rows = {name: t["rows"] for name, t in _emb_tables(cluster, node).items()}
        assert rows and max(rows.values()) <= BUDGET, (node, rows)
        held = sum(rows.values()) * row_bytes(4)  # the store's price of a row
        assert held <= MEMORY, (node, held, MEMORY)
        print(f"{node}: {sum(rows.values())} rows, {held} B of the {MEMORY} B budget")
    metrics = httpx.get(cluster.url("source", "/metrics"), timeout=10).text
    used = next(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("ekko_train_embedding_memory_bytes{") and 'kind="used"' in line
    )
    assert 0 < used <= MEMORY

    held_out = next(batches)
    r = cluster.post(replica, "/v1/models/ctr/predict", _body(held_out, labels=False))
    assert r.status_code == 200, r.text
    ctrs = np.asarray([p["ctr"] for p in r.json()["predictions"]])
    assert all(math.isfinite(c) for c in ctrs) and ctrs.std() > 0
