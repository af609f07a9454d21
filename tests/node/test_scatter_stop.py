"""A serving node of a partitioned cluster closes its scatter client when it stops: the
lookup streams it opened to other partitions' holders are closed (each holder reads EOF)
rather than outliving the node on its event loop; a predict still in flight opens no new
one."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from ekko.bench.scale_cluster import partitioned_doc, write_configs
from ekko.node.config import ModelConfig, load_config
from ekko.node.runner import NodeRunner
from ekko.serve.scatter_fetch import HolderFailed, PartitionUnavailable
from ekko.store import shard_of

MODEL = ModelConfig(name="ctr", rows_per_table=100, embedding_dim=4, num_sparse=2)


async def test_stopping_a_serving_node_closes_its_lookup_streams(tmp_path: Path) -> None:
    closed = asyncio.Event()
    opened = asyncio.Event()

    async def holder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Partition 1's holder: takes the stream and never answers (until EOF)."""
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n"
            b"upgrade: ekko-lookup/1\r\nekko-max-frame-bytes: 65536\r\n\r\n"
        )
        opened.set()
        while await reader.read(65536):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(holder, "127.0.0.1", 0)
    doc = partitioned_doc(MODEL, partitions=2, dcs=1, replicas=1, shards=4,
                          sync={"snapshot_interval_s": 0})  # fmt: skip
    for n in doc["nodes"]:
        if n["name"] == "dc1-p1-r0":
            n["admin_port"] = port = server.sockets[0].getsockname()[1]
    _, node_configs = write_configs(doc, MODEL, tmp_path)
    runner = NodeRunner(load_config(node_configs["dc1-p0-r0"]), "dc1-p0-r0", tmp_path)
    task = asyncio.create_task(runner.run())
    try:
        rows = runner.models.rows
        assert rows is not None
        rows.keys.num_shards = lambda table: 4  # the catalog would come from source-p0
        parts = rows.keys.partition_of_keys("emb_0", np.arange(64, dtype=np.int64))
        keys = np.flatnonzero(parts == 1)[:4].astype(np.int64)
        assert (rows.placement.partitions_of("emb_0", 4)[shard_of(keys, 4)] == 1).all()
        rows.config = type(rows.config)(deadline_s=0.3)
        for _ in range(40):  # on a loaded machine the first deadline may pass before the 101
            try:
                await rows.lookup({"emb_0": keys})
            except PartitionUnavailable as exc:
                assert "partition 1" in str(exc)
            if opened.is_set():
                break
        assert opened.is_set(), "the holder never saw its lookup stream open"
        streams = [o.result() for o in rows.fetch.remote._streams.values() if o.done()]
        assert len(streams) == 1 and not streams[0].closed
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)
    await asyncio.wait_for(closed.wait(), 5)  # the holder read EOF: the stream was closed
    assert all(s.closed for s in streams)
    with pytest.raises(HolderFailed, match="scatter client is closed"):  # opens nothing new
        await rows.fetch.remote(f"http://127.0.0.1:{port}", {"emb_0": keys}, {})
    server.close()
    await server.wait_closed()
