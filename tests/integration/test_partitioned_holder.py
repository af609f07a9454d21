"""The guard's holder side on a real partitioned cluster (processes, sockets): a holder's
baseline lookups answer its lagged rows, a redirect freezes them while online moves on, and
a holder killed -9 while redirected comes back frozen (its guard.log), then asks the
coordinator and is released once the coordinator has no incident in progress; a serving node
redirected starts a real incident, and the coordinator's holders_restored returns its
traffic to online once both holders reported their digests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from ekko.client import ClientError
from ekko.client.credentials import Credentials
from ekko.client.lookup_stream import LookupStream
from ekko.guard.log import TransitionLog
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.ops.launcher import LocalCluster
from ekko.store import shard_of

MODEL = {"name": "ctr", "rows_per_table": 1000, "embedding_dim": 4, "baseline_lag_s": 0.5}
HOLDER = "dc1-p0-r0"


def _keys(cluster: LocalCluster, partition: int, n: int) -> np.ndarray:
    keys = np.arange(4000, dtype=np.int64)
    parts = cluster.config.placement().partitions_of("emb", 8)[shard_of(keys, 8)]
    return keys[parts == partition][:n]


def _lookup(cluster: LocalCluster, name: str, keys: np.ndarray, variant: str):
    async def go():
        url = cluster.url(name, "")
        stream = await LookupStream.open(url, Credentials(secret=cluster.secret), variant=variant)
        try:
            return (await stream.lookup({"emb": keys}))["emb"]
        finally:
            await stream.close()

    return asyncio.run(go())


def _found(cluster: LocalCluster, name: str, keys: np.ndarray, variant: str):
    """The rows when every key is found there, else None (a table not there yet: 404)."""
    try:
        rows = _lookup(cluster, name, keys, variant)
    except ClientError as exc:
        assert exc.status == 404, exc
        return None
    return rows if rows.found.all() else None


def _until(what, check, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _write(cluster: LocalCluster, keys: np.ndarray, value: float) -> None:
    body = {"keys": keys.tolist(), "values": np.full((keys.size, 4), value).tolist()}
    r = cluster.post("source-p0", "/v1/tables/emb/rows", body)
    assert r.status_code == 200, r.text


def test_a_holders_baseline_freezes_and_a_killed_holder_comes_back_frozen(tmp_path: Path):
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, serve=True, models=[MODEL],
                      tables=[("emb", 4, 8)], sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["guard"] = {"enabled": True, "interval_s": 0.3}
    for node in doc["nodes"]:  # a holder only: a serving guard redirected by hand would
        if node["name"] == HOLDER:  # report corrupted and start a real incident
            node["serve"] = False
    with LocalCluster(write_cluster(doc, tmp_path / "cluster.toml")) as cluster:
        cluster.start(timeout=60)
        keys = _keys(cluster, 0, 6)
        _write(cluster, keys, 1.0)
        base = _until("the baseline rows", lambda: _found(cluster, HOLDER, keys, "baseline"))
        np.testing.assert_array_equal(base.values, 1.0)
        r = cluster.post(HOLDER, "/v1/models/ctr/guard/redirect", {"why": "test", "epoch": 0})
        assert r.status_code == 200 and r.json()["stale"] is False, r.text
        _write(cluster, keys, 9.0)
        _until("online to move on",
               lambda: (_lookup(cluster, HOLDER, keys, "online").values == 9.0).all())  # fmt: skip
        time.sleep(1.0)  # twice the lag: the baseline would have applied them
        np.testing.assert_array_equal(_lookup(cluster, HOLDER, keys, "baseline").values, 1.0)
        holder = cluster.get(HOLDER, "/v1/models/ctr/health")["holder"]
        assert holder["baseline"]["frozen"] and holder["frozen_for"] == 0

        cluster.kill(HOLDER)
        cluster.start([HOLDER], timeout=60)
        log_path = Path(cluster.log_dir) / HOLDER / "guard.log"
        events = lambda: [r["event"] for r in TransitionLog.read(log_path)]  # noqa: E731
        _until("the restarted holder to resume frozen", lambda: "holder_resumed" in events())
        # the coordinator knows no incident (the redirect was ours): it is released
        _until("the release", lambda: events()[-1] == "holder_released")
        assert not cluster.get(HOLDER, "/v1/models/ctr/health")["holder"]["baseline"]["frozen"]

        # A serving node redirected reports corrupted: the coordinator rolls back every
        # partition, both holders report, and holders_restored returns its traffic online.
        serving = "dc1-p1-r0"
        r = cluster.post(serving, "/v1/models/ctr/guard/redirect", {"why": "test", "epoch": 0})
        assert r.status_code == 200, r.text

        def incident() -> dict | None:
            done = cluster.get("source-p0", "/v1/models/ctr/health")["incidents"]
            return done[-1] if done else None

        inc = _until("the incident to complete", incident)
        assert set(inc["restored"]) == {HOLDER, serving}, inc
        assert inc["replica_table_mismatches"] == {}, inc
        _until("traffic back online", lambda: not cluster.get(
            serving, "/v1/models/ctr/health")["redirected"])  # fmt: skip
        holder = cluster.get(HOLDER, "/v1/models/ctr/health")["holder"]
        assert holder["frozen_for"] == 0 and holder["restores"][-1]["epoch"] == 0
