"""A trainer whose worker thread dies is never silent on a running source: ``GET /train``
says why, ``/ready`` answers 503 naming it, ``/metrics`` shows it, the log has the traceback.
(On the old main the thread died while ``GET /train`` said ``"failed": null``.)"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import pytest

from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.train.streams import StreamConfig, SyntheticStream

MODEL = {"name": "ctr", "rows_per_table": 500, "embedding_dim": 8}


async def test_a_dead_trainer_makes_ready_503_naming_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = cluster_doc(dcs=1, replicas=1, models=[MODEL], sync={"snapshot_interval_s": 0})
    doc["durability"] = {"recovery_timeout_s": 0.5}  # run alone: no replica to recover from
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    runner = NodeRunner(cfg, "source", tmp_path)
    task = asyncio.create_task(runner.run())
    await asyncio.wait_for(runner.ready.wait(), 60)
    batch = next(SyntheticStream(StreamConfig(max_vocab=500, initial_items=100)).batches(16))
    body = {
        "dense": batch.dense.tolist(),
        "sparse": batch.sparse.tolist(),
        "labels": batch.labels.astype(int).tolist(),
    }
    node = cfg.node("source")
    base = f"http://{node.host}:{node.admin_port}"
    async with httpx.AsyncClient(base_url=base, auth=ClusterAuth(runner.secret)) as client:
        assert (await client.get("/ready")).status_code == 200

        def broken(events: object) -> None:
            raise RuntimeError("injected: the optimizer exploded")

        runner.models.trainers["ctr"].trainer.step = broken  # type: ignore[method-assign]
        assert (await client.post("/v1/models/ctr/train", json=body)).status_code == 202
        end = time.monotonic() + 30
        while (report := (await client.get("/v1/models/ctr/train")).json())["failed"] is None:
            assert time.monotonic() < end, "the trainer's failure never showed"
            await asyncio.sleep(0.05)  # the worker thread runs the step; bounded by the deadline
        why = "RuntimeError: injected: the optimizer exploded"
        assert report["failed"] == why
        ready = await client.get("/ready")
        assert ready.status_code == 503 and ready.json()["down"]["trainer/ctr"] == why
        metrics = (await client.get("/metrics")).text
        assert 'ekko_train_failed{model="ctr"} 1.0' in metrics
        refused = await client.post("/v1/models/ctr/train", json=body)
        assert refused.status_code == 503 and why in refused.json()["error"]
    assert any(
        r.levelno == logging.ERROR and r.exc_info and "trainer of ctr failed" in r.getMessage()
        for r in caplog.records
    )
    runner.stop()
    await asyncio.wait_for(task, 30)
