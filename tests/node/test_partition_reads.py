"""A partition holder refuses lookups of keys it cannot hold (issue 17): 421 naming the
partition, on a lookup stream, ``POST /v1/lookup``, a table's lookup and its rows, as a write
of them is refused — it answered them "not found", so a caller whose placement disagreed
(another shard count, a wrong holder) read missing rows as absent ones, silently."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest

from ekko.client import ClientError
from ekko.client.credentials import Credentials
from ekko.client.lookup_stream import LookupStream
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupManyFrame, encode
from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store import shard_of


def _keys(cfg, partition: int, n: int) -> np.ndarray:
    keys = np.arange(2000, dtype=np.int64)
    return keys[cfg.placement().partitions_of("emb", 8)[shard_of(keys, 8)] == partition][:n]


async def test_a_holder_refuses_lookups_of_another_partitions_keys(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, partitions=2, tables=[("emb", 4, 8)],
                      sync={"snapshot_interval_s": 0})  # fmt: skip
    doc["durability"] = {"recovery_timeout_s": 0.2}  # run alone: no replica to recover from
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    runner = NodeRunner(cfg, "source-p0", tmp_path)
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.ready.wait(), 30)
        url = f"http://127.0.0.1:{runner.core.node.admin_port}"
        mine, theirs = _keys(cfg, 0, 5), _keys(cfg, 1, 3)
        both = np.concatenate([mine, theirs])
        runner.core.write("emb", mine, np.ones((5, 4), np.float32))
        why = "is in partition 1, which this node does not hold"
        stream = await LookupStream.open(url, Credentials(secret=runner.secret))
        try:
            with pytest.raises(ClientError, match=why) as caught:
                await stream.lookup({"emb": both})
            assert caught.value.status == 421
            assert (await stream.lookup({"emb": mine}))["emb"].found.all()  # goes on
        finally:
            await stream.close()
        async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as c:
            body = encode(LookupManyFrame(["emb"], np.array([both.size]), both))
            headers = {"content-type": ROWS_MEDIA_TYPE, "accept": ROWS_MEDIA_TYPE}
            r = await c.post("/v1/lookup", content=body, headers=headers)
            assert r.status_code == 421 and why in r.text, r.text
            r = await c.post("/v1/tables/emb/lookup", json={"keys": both.tolist()})
            assert r.status_code == 421 and why in r.text, r.text
            r = await c.get("/v1/tables/emb/rows", params={"keys": ",".join(map(str, both))})
            assert r.status_code == 421 and why in r.text, r.text
            r = await c.post("/v1/tables/emb/lookup", json={"keys": mine.tolist()})
            assert r.status_code == 200 and all(r.json()["found"]), r.text
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
