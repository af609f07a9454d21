"""A partition holder refuses lookups of keys it cannot hold (issue 17): 421 naming the
partition, on a lookup stream, ``POST /v1/lookup``, a table's lookup and its rows, as a write
of them is refused — it answered them "not found", so a caller whose placement disagreed
(another shard count, a wrong holder) read missing rows as absent ones, silently."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from partition_node import keys_of, lone_source

from ekko.client import ClientError
from ekko.client.credentials import Credentials
from ekko.client.lookup_stream import LookupStream
from ekko.client.wire import ROWS_MEDIA_TYPE, LookupManyFrame, encode
from ekko.node.access import ClusterAuth


async def test_a_holder_refuses_lookups_of_another_partitions_keys(tmp_path: Path) -> None:
    async with lone_source(tmp_path) as (cfg, runner):
        url = f"http://127.0.0.1:{runner.core.node.admin_port}"
        mine, theirs = keys_of(cfg, 0, 5), keys_of(cfg, 1, 3)
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
