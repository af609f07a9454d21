"""The guard on a partitioned cluster of real processes (2 partitions, 2 inference DCs).

Poisoned ranks: 2 sharded ranks train while serving nodes predict and get true labels back,
then train on flipped labels; a serving node detects, the coordinator (source of partition 0)
rolls every partition back, every holder reports digests equal per (table, partition) to its
source's, traffic returns to online, the ranks wait out the quarantine's 409s, reload and
train on, and no process dies. Operator rollbacks: each source restores its own rows and
refuses writes with the 409 contract; a partition source killed with -9 cannot restore, and
the coordinator says so by name (never a silent "healthy") while the restarted source serves.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from cluster_checks import until

from ekko.client.base import Target
from ekko.client.credentials import Credentials
from ekko.client.sync import Client
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.schedule.quarantine import EPOCH_HEADER, UNTIL_HEADER
from ekko.store import shard_of

pytestmark = pytest.mark.integration

MODEL = {"name": "ctr", "rows_per_table": 1_000, "embedding_dim": 8, "bottom_mlp": [16, 8],
         "top_mlp": [16, 1], "embedding_shards": 8}  # fmt: skip
GUARD = {"enabled": True, "interval_s": 0.2, "rollback_margin_s": 0.0, "quarantine_s": 4.0,
         "probation": 1, "restore_timeout_s": 2.0}  # fmt: skip
TABLE, SHARDS, DIM = "emb_0", 8, 8
M = "/v1/models/ctr"
HOLDERS = ["dc1-p0-r0", "dc1-p1-r0", "dc2-p0-r0", "dc2-p1-r0"]


def _keys(cluster: LocalCluster, p: int) -> np.ndarray:
    every = np.arange(2_000, dtype=np.int64)
    parts = cluster.config.placement().partitions_of(TABLE, SHARDS)[shard_of(every, SHARDS)]
    return every[parts == p][:200]


def _write(cluster: LocalCluster, creds: Credentials, value: float) -> list:
    """Write ``value`` to every row of both partitions at their sources; their answers."""
    out = []
    for p in range(2):
        k = _keys(cluster, p)
        body = {"keys": k.tolist(), "values": np.full((k.size, DIM), value).tolist()}
        out.append(cluster.post(f"source-p{p}", f"/v1/tables/{TABLE}/rows", body))
    return out


def _values(cluster: LocalCluster, creds: Credentials, name: str, p: int) -> np.ndarray:
    with Client(Target.at(cluster.url(name, ""), creds)) as c:
        return np.asarray(c.lookup(TABLE, _keys(cluster, p)).values)


def _checkpointed_after(cluster: LocalCluster, at: float) -> bool:
    """The coordinator marked a healthy checkpoint after ``at`` and source-p1 has it too."""
    coord = cluster.get("source-p0", f"{M}/health")
    other = cluster.get("source-p1", f"{M}/health")
    return (coord["last_all_healthy"] or 0) > at and (
        other["preimages"]["earliest_restorable"] or 0
    ) > 0


def test_the_coordinator_rolls_back_every_partition_and_names_a_dead_source(tmp_path: Path):
    doc = cluster_doc(dcs=2, replicas=1, partitions=2, wan_delay_ms=[5, 10], models=[MODEL],
                      serve=True, sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = GUARD
    path = write_cluster(doc, tmp_path / "cluster.toml")
    creds = Credentials.from_secret_file(tmp_path / "cluster.secret")
    with LocalCluster(path) as cluster:
        cluster.start()
        for p in range(2):
            body = {"name": TABLE, "dim": DIM, "shards": SHARDS}
            assert cluster.post(f"source-p{p}", "/v1/tables", body).status_code in (200, 201)
        assert all(r.status_code == 200 for r in _write(cluster, creds, 1.0))
        healthy_at = time.time()
        until(
            "a healthy checkpoint at both sources", lambda: _checkpointed_after(cluster, healthy_at)
        )
        poisoned_at = time.time()  # the coordinator checkpoints while nobody complains:
        assert all(r.status_code == 200 for r in _write(cluster, creds, 99.0))  # the poison
        r = cluster.post("source-p0", f"{M}/rollback", {"to": poisoned_at, "why": "test poison"})
        assert r.status_code == 200, r.text
        epoch = r.json()["epoch"]

        # Every source refuses writes of the model's tables with the contract a rank reads.
        for answer in _write(cluster, creds, 7.0):
            assert answer.status_code == 409, answer.text
            assert answer.json()["error"].startswith(
                f"quarantined: model ctr rolled back (epoch {epoch})"
            )
            assert answer.headers[EPOCH_HEADER] == str(epoch)
            assert float(answer.headers[UNTIL_HEADER]) > time.time()

        def done() -> dict | None:
            incidents = cluster.get("source-p0", f"{M}/health")["incidents"]
            return incidents[-1] if incidents and incidents[-1]["epoch"] == epoch else None

        inc = until("every holder restored", done, 30.0)
        assert "failed_sources" not in inc, inc
        assert set(inc["restored"]) == set(HOLDERS)
        assert inc["replica_table_mismatches"] == {} and inc["good_rows_lost"] == 0
        assert inc["rows_restored"] == 400 and set(inc["sources"]) == {"source-p0", "source-p1"}, (
            inc
        )
        for p in range(2):
            for name in (f"source-p{p}", f"dc1-p{p}-r0", f"dc2-p{p}-r0"):
                assert (_values(cluster, creds, name, p) == 1.0).all(), name
        until(
            "the quarantine ends",
            lambda: all(r.status_code == 200 for r in _write(cluster, creds, 2.0)),
            10.0,
        )

        # A partition source killed with -9: the next rollback cannot restore there.
        cluster.kill("source-p1")
        # (no traffic: the serving nodes stay on probation, so the restore point is still the
        # first incident's checkpoint; an operator may roll back to it again)
        back = {"to": inc["checkpoint_at"], "why": "source down"}
        r = cluster.post("source-p0", f"{M}/rollback", back)
        assert r.status_code == 200, r.text

        def failed() -> dict | None:
            health = cluster.get("source-p0", f"{M}/health")
            last = health["incidents"][-1] if health["incidents"] else {}
            return health if last.get("failed_sources") else None

        health = until("the coordinator names the dead source", failed, 15.0)
        assert health["state"] == "corrupted"
        assert set(health["incidents"][-1]["failed_sources"]) == {"source-p1"}
        assert "not restored at source-p1 (partitions [1])" in health["rollback_error"]
        cluster.restart("source-p1")
        cluster.wait_ready("source-p1")
        assert (_values(cluster, creds, "source-p1", 1) == 2.0).all()  # its data, serving
        time.sleep(1.0)  # several guard intervals: it must not turn healthy by itself
        assert cluster.get("source-p0", f"{M}/health")["state"] == "corrupted"
        for name in cluster.procs:
            assert cluster.procs[name].alive, f"{name} died"


POISON_MODEL = {"name": "ctr", "rows_per_table": 2_000, "embedding_dim": 8,
                "bottom_mlp": [16, 8], "top_mlp": [16, 1], "optimizer": "adagrad",
                "sparse_lr": 0.05, "dense_lr": 0.01, "dense_interval_s": 0.5,
                "baseline_lag_s": 6.0}  # fmt: skip
POISON_GUARD = {"enabled": True, "interval_s": 0.5, "min_samples": 60, "probation": 2,
                "rollback_margin_s": 9.0, "quarantine_s": 6.0,
                "restore_timeout_s": 5.0}  # fmt: skip
SERVING = {"dc1-p0-r0": None, "dc2-p1-r0": None}


def test_poisoned_ranks_are_detected_rolled_back_everywhere_and_train_on(tmp_path: Path):
    """The design's acceptance run: 2 sharded ranks train while two serving nodes (one per DC)
    predict and get true labels back; the ranks then train on flipped labels; a serving node
    detects, the coordinator rolls every partition back, every holder reports equal digests
    per (table, partition), the ranks (refused with the quarantine's 409) reload and train on
    after it, and no process dies."""
    import asyncio
    import itertools

    import httpx

    from ekko.demo.loop import OnlineLoop
    from ekko.demo.partitioned import ShardedFeed
    from ekko.train.streams import StreamConfig, SyntheticStream

    doc = cluster_doc(dcs=2, replicas=1, partitions=2, wan_delay_ms=[5, 10],
                      models=[POISON_MODEL], serve=True,
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = POISON_GUARD
    path = write_cluster(doc, tmp_path / "cluster.toml")
    with LocalCluster(path) as cluster:
        cluster.start()
        feed = ShardedFeed(cluster.config, path, cluster.config.model("ctr"), ranks=2)
        try:
            stream = SyntheticStream(StreamConfig(seed=3, max_vocab=4_000, initial_items=1_500))
            batches = stream.batches(256)

            async def drive() -> OnlineLoop:
                auth = cluster.auth
                async with httpx.AsyncClient(auth=auth, timeout=10.0) as client:
                    replicas = {n: cluster.url(n, "") for n in SERVING}
                    loop = OnlineLoop(client, replicas, "", "ctr", rate=1_500.0,
                                      poison=lambda t: 9.0 <= t < 15.0,
                                      train=feed.submit)  # fmt: skip
                    for events in itertools.islice(batches, 20):  # a model worth guarding
                        await loop.train_only(events)
                    await loop.run(batches, asyncio.Event(), 30.0)
                    return loop

            loop = asyncio.run(drive())
            assert loop.poisoned_events > 0
            health = cluster.get("source-p0", f"{M}/health")
            incidents = [i for i in health["incidents"] if i["automatic"]]
            assert incidents, health["transitions"]
            first = incidents[0]
            assert "failed_sources" not in first and first["rows_restored"] > 0, first
            assert set(first["restored"]) == set(HOLDERS), first
            assert first["replica_table_mismatches"] == {} and first["good_rows_lost"] == 0
            assert first["checkpoint_at"] < loop.poison_started_at
            docs = {name: cluster.get(name, f"{M}/health") for name in SERVING}
            assert any(d["redirects"] for d in docs.values()), docs  # served the baseline
            for name, d in docs.items():  # and traffic is back on the online model
                assert d["redirected"] is False, (name, d)
            report = feed.report()
            assert report["failed"] is None, report
            assert report["rejected_steps"] > 0  # the ranks waited out the quarantine
        finally:
            for q in feed.queues:  # a dead rank leaves its queue full: exit must not wait on it
                q.cancel_join_thread()
            reports = feed.close()
        assert len(reports) == 2 and all(r.steps > 30 for r in reports)
        for name in cluster.procs:
            assert cluster.procs[name].alive, f"{name} died"
