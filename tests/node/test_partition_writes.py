"""A partition's source takes writes of its own shards only, within its node's memory
budget (issue 17): a key of another partition is answered 421 naming the partition and its
source, a write past ``max_memory_mb`` 507 naming table and partition; the node serves on and
keeps every row it had."""

from __future__ import annotations

from pathlib import Path

import httpx
from partition_node import keys_of, lone_source

from ekko.node.access import ClusterAuth
from ekko.store.holding import row_bytes


async def test_a_partition_source_refuses_other_shards_and_growth_past_its_budget(tmp_path: Path):
    budget_rows = 1300
    budget_mb = budget_rows * row_bytes(4) / (1 << 20)
    async with lone_source(tmp_path, max_memory_mb=budget_mb) as (cfg, runner):
        table = runner.core.store.table("emb")
        assert table.capacity == 512  # of 1 024 initial rows, its half of the shards hold half
        url = f"http://127.0.0.1:{runner.core.node.admin_port}"
        async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as client:

            async def write(keys: list[int]) -> httpx.Response:
                body = {"keys": keys, "values": [[0.5] * 4] * len(keys)}
                return await client.post("/v1/tables/emb/rows", json=body)

            mine, theirs = keys_of(cfg, 0, 1400).tolist(), keys_of(cfg, 1, 1).tolist()
            assert (await write(mine[:1200])).status_code == 200
            r = await write([mine[0], theirs[0]])
            assert r.status_code == 421, r.text
            assert "is in partition 1, which this node does not hold" in r.text
            assert "its source is source-p1" in r.text
            digest = table.digest()
            r = await write(mine[1150:1400])  # 200 new rows: 1 400 > 1 300
            assert r.status_code == 507, r.text
            assert "table 'emb' partition 0: 200 new rows" in r.text
            assert "max_memory_mb" in r.text
            assert table.rows == 1200 and table.digest() == digest
            assert (await write(mine[1200:1300])).status_code == 200  # up to the budget
            assert (await client.get("/ready")).status_code == 200
