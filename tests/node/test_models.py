"""Model hosting on a node: the loop hand-off of trainer writes, checkpoint roles, model config."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from ekko.node.config import ClusterConfig, ModelConfig
from ekko.node.models import LoopSink
from ekko.ops.cluster_init import cluster_doc
from ekko.store.spec import TableSpec
from ekko.train.sink import MemorySink


async def test_loop_sink_applies_writes_on_the_loop_thread_in_order() -> None:
    loop = asyncio.get_running_loop()
    loop_thread = threading.get_ident()
    seen: list[int] = []
    drained = asyncio.Event()

    class Recording(MemorySink):
        def write(self, table, keys, values):
            assert threading.get_ident() == loop_thread
            seen.append(int(keys[0]))
            super().write(table, keys, values)

    sink = Recording()
    loop_sink = LoopSink(loop, sink, on_drained=drained.set)

    def trainer() -> None:
        loop_sink.create_table(TableSpec("emb", 2, 4))
        for k in range(200):
            loop_sink.write("emb", np.array([k], np.int64), np.full((1, 2), k, np.float32))

    t = threading.Thread(target=trainer)
    t.start()
    t.join()
    while len(seen) < 200:
        await drained.wait()
        drained.clear()
    assert seen == list(range(200))
    np.testing.assert_array_equal(sink.lookup("emb", np.array([7]))[0], [7.0, 7.0])


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
