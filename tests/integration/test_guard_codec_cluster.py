"""The replica guard's baseline keeps applying rows over an int4 WAN (issue 13 §3), across
processes, with the guard, the scheduler (deferral) and WAN pacing all on.

Before the fix the baseline was fed the raw wire chunks (rows in an int4 block, empty
``keys``): ``LaggedStore.advance`` raised ``baseline_lag_s`` after the first pull, the guard
task died without a log line, the baseline applied 0 rows while its queue grew, and the
replica still reported "healthy". Now the baseline applies what the replica applied, every
task is supervised (``/ready``, ``ekko_task_*``), and a guard without feedback says so.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.train.streams import StreamConfig, SyntheticStream

pytestmark = pytest.mark.integration

REPLICAS = ("dc1-r0", "dc2-r0")


def _train(cluster: LocalCluster, batches, n: int) -> None:
    for _ in range(n):
        ev = next(batches)
        body = {
            "dense": ev.dense.tolist(),
            "sparse": ev.sparse.tolist(),
            "labels": ev.labels.astype(np.int64).tolist(),
        }
        for _attempt in range(100):
            r = cluster.post("source", "/v1/models/ctr/train", body)
            if r.status_code != 503:
                break
        assert r.status_code == 202, r.text


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start!r} not in /metrics")


def test_int4_wan_guard_scheduler_pacing_baseline_keeps_applying(tmp_path: Path) -> None:
    model = {
        "name": "ctr",
        "rows_per_table": 20_000,
        "embedding_dim": 8,
        "dense_interval_s": 0.5,
        "baseline_lag_s": 2.0,
    }
    doc = cluster_doc(
        dcs=2,
        replicas=1,
        wan_delay_ms=[10.0, 25.0],
        wan_mbit=100.0,
        serve=True,
        models=[model],
        sync={"wan_codec": "int4", "pace_wan": True, "snapshot_interval_s": 0},
    )
    doc["guard"] = {"enabled": True, "interval_s": 0.5}
    doc["scheduler"] = {"enabled": True, "defer": True, "max_staleness_s": 1.0}
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=120)
        batches = SyntheticStream(StreamConfig(seed=3)).batches(256)
        applied: dict[str, list[int]] = {n: [] for n in REPLICAS}
        deadline = time.monotonic() + 60
        # two rounds of training, each followed by the baseline catching up (lag 2 s)
        for _round in range(2):
            _train(cluster, batches, 20)
            while True:
                health = {n: cluster.get(n, "/v1/models/ctr/health") for n in REPLICAS}
                got = {n: h["baseline"]["applied_rows"] for n, h in health.items()}
                grew = all(got[n] > (applied[n][-1] if applied[n] else 0) for n in REPLICAS)
                if grew and all(h["baseline"]["queued_rows"] == 0 for h in health.values()):
                    break
                assert time.monotonic() < deadline, f"baseline stopped applying: {health}"
                time.sleep(0.25)  # polling other processes over HTTP, bounded by the deadline
            for n in REPLICAS:
                applied[n].append(got[n])
        for n in REPLICAS:
            r = httpx.get(cluster.url(n, "/ready"), timeout=5)
            assert r.status_code == 200, r.text
            metrics = httpx.get(cluster.url(n, "/metrics"), timeout=5).text
            assert _metric(metrics, 'ekko_task_restarts_total{task="guard"}') == 0
            assert _metric(metrics, 'ekko_task_up{task="guard"}') == 1
            assert _metric(metrics, 'ekko_baseline_applied_rows_total{model="ctr"}') > 0
            # no predictions were served: the guard says it cannot judge, not "healthy 0.0"
            assert _metric(metrics, 'ekko_guard_judging{judging="no_samples",model="ctr"}') == 1
            h = cluster.get(n, "/v1/models/ctr/health")
            assert h["judging"] == "no_samples" and h["judgement"] == "no samples"
        src = cluster.get("source", "/v1/models/ctr/health")
        assert set(src["replicas"]) == set(REPLICAS), src["replicas"]
        assert {r["judgement"] for r in src["reports"].values()} == {"no samples"}
