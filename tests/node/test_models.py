"""Model hosting on a node: the loop hand-off of trainer writes, checkpoint roles, model config."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from ekko.node.config import ClusterConfig, ModelConfig
from ekko.node.models import LoopSink
from ekko.ops.cluster_init import cluster_doc
from ekko.schedule import WritePort
from ekko.store import Store
from ekko.store.spec import TableSpec


async def test_loop_sink_applies_writes_on_the_loop_thread_in_order_one_wake_per_drain() -> None:
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    wakes: list[int] = []
    woke = asyncio.Event()
    store = Store()

    def on_written() -> None:
        assert threading.get_ident() == loop_thread
        wakes.append(store.table("emb").statistics().rows_written)
        woke.set()

    port = WritePort(store, on_written=on_written)
    loop_sink = LoopSink(loop, port)

    def trainer() -> None:
        loop_sink.create_table(TableSpec("emb", 2, 4))
        for k in range(200):  # one key rewritten: the last write wins only in order
            loop_sink.write("emb", np.array([0], np.int64), np.full((1, 2), k, np.float32))

    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    while not wakes or wakes[-1] < 200:
        await woke.wait()
        woke.clear()
    assert len(wakes) < 200  # a drain of many writes wakes parked pulls once
    np.testing.assert_array_equal(store.table("emb").lookup(np.array([0]))[0][0], [199.0, 199.0])


async def test_loop_sink_deletes_in_order_with_the_writes_of_a_trainer_thread() -> None:
    """A dynamic table's evictions are deletes through the port, in their place: a key
    evicted and admitted again is live, one written and then evicted is not."""
    loop = asyncio.get_running_loop()
    store = Store()
    port = WritePort(store)
    loop_sink = LoopSink(loop, port)

    def trainer() -> None:
        loop_sink.create_table(TableSpec("emb", 2, 4))
        loop_sink.write("emb", np.arange(4, dtype=np.int64), np.ones((4, 2), np.float32))
        loop_sink.delete("emb", np.array([0, 1], np.int64))
        loop_sink.write("emb", np.array([0], np.int64), np.full((1, 2), 3, np.float32))

    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    loop_sink.drain()
    table = store.table("emb")
    _, _, found = table.lookup(np.arange(4, dtype=np.int64))
    assert found.tolist() == [True, False, True, True] and table.tombstones == 1


async def test_loop_sink_on_the_loop_thread_writes_at_once_after_what_was_queued() -> None:
    """The trainer holds one sink from its construction: its bootstrap, on the loop's
    thread, writes straight into the store (the tables exist when it returns), after any
    write still queued from the worker thread."""
    loop = asyncio.get_running_loop()
    store = Store()
    wakes: list[int] = []
    port = WritePort(store, on_written=lambda: wakes.append(1))
    loop_sink = LoopSink(loop, port)
    loop_sink.create_table(TableSpec("emb", 2, 4))
    assert "emb" in store.tables  # at once, no loop turn
    t = threading.Thread(
        target=lambda: loop_sink.write("emb", np.array([0], np.int64), np.ones((1, 2), np.float32))
    )
    t.start()
    t.join()
    assert store.table("emb").rows == 0  # queued for the loop
    loop_sink.write("emb", np.array([0], np.int64), np.full((1, 2), 2.0, np.float32))
    np.testing.assert_array_equal(store.table("emb").lookup(np.array([0]))[0][0], [2.0, 2.0])
    assert store.table("emb").statistics().rows_written == 2 and len(wakes) == 1  # one batch


def test_checkpoint_replica_has_its_own_role_and_no_upstream() -> None:
    doc = cluster_doc(
        dcs=2, replicas=1, serve=True, models=[{"name": "ctr"}], checkpoint_every_s=30
    )
    cfg = ClusterConfig.model_validate(doc)
    assert cfg.role("ckpt-r0") == "checkpoint"
    assert cfg.upstreams("ckpt-r0") == []
    assert cfg.node("ckpt-r0").checkpoint_interval_s == 30
    assert [n.name for n in cfg.dc_nodes("ckpt")] == []  # nobody syncs from it
    assert cfg.tables == []  # a model cluster needs no plain tables


def test_model_config_names_a_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"models\[ctr\].bottom_mlp must end with embedding_dim=8"):
        ModelConfig(name="ctr", embedding_dim=8, bottom_mlp=(64, 16))
    with pytest.raises(ValueError, match="top_mlp must end with 1"):
        ModelConfig(name="ctr", top_mlp=(8, 2))
    assert ModelConfig(embedding_dim=8).dlrm().bottom_mlp == (64, 8)
