"""Scatter-gather predicts against real nodes (issue 17): two full replicas hold partitions
{0, 1} each (and the source is a last holder of partition 1); a predict through the scatter
path equals the replica's own predict bit for bit; after ``kill -9`` of one replica every
partition fails over to the other; with both replicas dead, partition 0 has no live holder
and the predict is a 503 naming it (partition 1 still answered by the source)."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from cluster_checks import until, wait_converged

from ekko.client.credentials import Credentials
from ekko.net.httpkit import bounded_app
from ekko.node.config import ModelConfig
from ekko.serve import build_services, serve_routes
from ekko.serve.scatter import PartitionedLookup
from ekko.serve.scatter_http import HttpHolders
from ekko.serve.scatter_policy import ScatterConfig
from ekko.store import Store
from ekko.store.placement import Placement

pytestmark = pytest.mark.integration

MODEL = {"name": "ctr", "rows_per_table": 500, "embedding_dim": 4, "dense_interval_s": 1.0}
R0, R1 = "dc1-r0", "dc1-r1"


def _events(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "dense": rng.random((n, 13)).round(3).tolist(),
        "sparse": rng.integers(0, 10**6, (n, 26)).tolist(),
    }


def _local_ctr(cluster, body: dict) -> np.ndarray:
    r = until("the replica serves", lambda: (r := cluster.post(R0, "/v1/models/ctr/predict", body))
              .status_code == 200 and r, deadline_s=60)  # fmt: skip
    return np.array([p["ctr"] for p in r.json()["predictions"]], dtype=np.float32)


async def _scatter_predicts(cluster, bodies: list[dict], kill) -> list[httpx.Response]:
    """Each body posted to a scatter-serving app in this process; ``kill(i)`` runs first."""
    url = lambda n: cluster.url(n, "")  # noqa: E731
    holders = {0: [url(R0), url(R1)], 1: [url(R1), url(R0), url("source")]}
    shards = {t["name"]: t["shards"] for t in cluster.get(R0, "/v1/tables")["tables"]}
    fetch = HttpHolders(Credentials(secret=cluster.secret))
    rows = PartitionedLookup(
        Placement(2), holders, fetch, shards.__getitem__, ScatterConfig(deadline_s=3.0)
    )
    model = ModelConfig(**MODEL).served()
    app = bounded_app(serve_routes(build_services(Store(), [model], rows=rows)))
    out = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serving") as c:
        for i, body in enumerate(bodies):
            kill(i)
            out.append(await c.post("/v1/models/ctr/predict", json=body))
    await fetch.close()
    return out


def test_scatter_predicts_equal_local_fail_over_and_name_a_dead_partition(make_cluster) -> None:
    cluster = make_cluster(dcs=1, replicas=2, serve=True, models=[MODEL],
                           sync={"snapshot_interval_s": 0})  # fmt: skip
    cluster.start(timeout=120)
    bodies = [_events(32, seed) for seed in range(3)]
    want = _local_ctr(cluster, bodies[0])  # the model is not trained: its rows stay put
    got = wait_converged(cluster)
    assert all(d == got["source"] for d in got.values()), got
    killed = {1: R0, 2: R1}

    def kill(i: int) -> None:
        if i in killed:
            cluster.kill(killed[i])

    t0 = time.monotonic()
    first, failed_over, dead = asyncio.run(_scatter_predicts(cluster, bodies, kill))
    assert first.status_code == 200, first.text
    got0 = np.array([p["ctr"] for p in first.json()["predictions"]], dtype=np.float32)
    np.testing.assert_array_equal(got0, want)
    assert failed_over.status_code == 200, failed_over.text  # R0 dead: R1 holds both
    assert len(failed_over.json()["predictions"]) == 32
    assert dead.status_code == 503, dead.text
    error = dead.json()["error"]
    assert "partition 0 has no live holder" in error, error
    assert cluster.url(R0, "") in error and cluster.url(R1, "") in error
    assert time.monotonic() - t0 < 10  # refused connections fail over at once, no deadline
