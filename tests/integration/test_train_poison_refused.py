"""One training request with a finite but huge dense value (3e38), across processes: refused
400 naming the field before anything is queued; the trainer keeps training, and every replica,
once converged with the source, serves finite predictions and takes feedback on them.

On the old main the request was queued (202), the step turned the dense weights into NaN,
every replica answered ``"ctr": null``, feedback answered 500 and the trainer thread died
while ``GET /train`` said ``"failed": null``."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
from cluster_checks import until

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.train.streams import StreamConfig, SyntheticStream

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 8, "dense_interval_s": 0.0}
REPLICAS = ("dc1-r0", "dc2-r0")


def _body(batch, labels: bool = True) -> dict:
    doc = {"dense": batch.dense.tolist(), "sparse": batch.sparse.tolist()}
    if labels:
        doc["labels"] = batch.labels.astype(int).tolist()
    return doc


def _converged(cluster: LocalCluster) -> bool:
    source = cluster.get("source", "/v1/status")["tables"]
    digests = {name: t["digest"] for name, t in source.items()}
    return all(
        {n: t["digest"] for n, t in cluster.get(r, "/v1/status")["tables"].items()} == digests
        for r in REPLICAS
    )


def test_huge_dense_value_is_refused_and_every_replica_keeps_finite_predictions(
    tmp_path: Path,
) -> None:
    doc = cluster_doc(dcs=2, replicas=1, serve=True, models=[MODEL],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    stream = SyntheticStream(StreamConfig(seed=1, max_vocab=1000, initial_items=500))
    batches = stream.batches(64)
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=120)
        for _ in range(3):
            r = cluster.post("source", "/v1/models/ctr/train", _body(next(batches)))
            assert r.status_code == 202, r.text
        poison = next(batches)
        poison.dense[5, 2] = 3e38  # finite in float32
        r = cluster.post("source", "/v1/models/ctr/train", _body(poison))
        assert r.status_code == 400, r.text
        error = r.json()["error"]  # the float32 value as sent: 3.0000000054977558e+38
        assert error.startswith("dense[5][2]: 3.0") and "e+38 is outside [-64, 64]" in error
        for _ in range(3):
            r = cluster.post("source", "/v1/models/ctr/train", _body(next(batches)))
            assert r.status_code == 202, r.text

        report = until(
            "six batches trained",
            lambda: (d := cluster.get("source", "/v1/models/ctr/train"))["batches"] == 6 and d,
        )
        assert report["failed"] is None and sum(report["rejected_steps"].values()) == 0
        until("replicas converged with the source", lambda: _converged(cluster))

        probe = next(batches)
        for name in REPLICAS:
            r = cluster.post(name, "/v1/models/ctr/predict", _body(probe, labels=False))
            assert r.status_code == 200, (name, r.text)
            preds = r.json()["predictions"]
            ctrs = [p["ctr"] for p in preds]
            assert all(isinstance(c, float) and math.isfinite(c) and 0 < c < 1 for c in ctrs)
            labels = [
                {"id": p["id"], "label": int(y)} for p, y in zip(preds, probe.labels, strict=True)
            ]
            fb = cluster.post(name, "/v1/models/ctr/feedback", {"labels": labels})
            assert fb.status_code == 200 and fb.json()["matched"] == 64, (name, fb.text)
            assert np.std(ctrs) > 0  # a real model, not a constant

        metrics = httpx.get(cluster.url("source", "/metrics"), timeout=10).text
        assert 'ekko_train_failed{model="ctr"} 0.0' in metrics
        r = cluster.post("source", "/v1/models/ctr/train", _body(next(batches)))
        assert r.status_code == 202, r.text  # the trainer is alive
