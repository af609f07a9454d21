"""Sharded training over two real rank processes (gloo): the same math as the 1-rank trainer,
rows published by their owner only, and a killed rank named by the survivors.

The run publishes as on a partitioned cluster of 3 partitions (``Placement(3)``): rank 0 owns
partitions 0 and 2, rank 1 partition 1, each writing through a ``PartitionRouter`` to one
``MemorySink`` per partition (rank 0 also to the partitions holding dense tables)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from ekko.quality.offline import auc
from ekko.store import shard_of
from ekko.store.placement import Placement
from ekko.train.dlrm import DLRM, DLRMConfig, dense_table_name, embedding_table_name
from ekko.train.sharded import ShardedRunSpec, ShardedTrainer, train_rank
from ekko.train.sharded_exchange import RowPlacement
from ekko.train.sharded_launch import RankContext, ShardedRun, ShardedRunError
from ekko.train.sink import MemorySink
from ekko.train.streams import StreamConfig, SyntheticStream
from ekko.train.trainer import OnlineTrainer, TrainerConfig

# conftest's small shapes (the spawned ranks import this module, not conftest)
SMALL_STREAM = StreamConfig(seed=3, max_vocab=5_000, initial_items=2_000)
SMALL_MODEL = DLRMConfig(rows_per_table=4_000, embedding_dim=8, bottom_mlp=(16, 8), top_mlp=(16, 1))
EVENTS, BATCH = 20_480, 1024
ADAGRAD = TrainerConfig(optimizer="adagrad")
PARTS = Placement(3)
NAMES = tuple(embedding_table_name(i) for i in range(SMALL_MODEL.num_sparse))


def _memory_sink(partition: int) -> MemorySink:
    return MemorySink()


def _poisoned_step(ctx: RankContext) -> tuple[str | None, bool, int]:
    """One good step, then a batch whose last event (the last rank's slice) has an inf:
    (the reject reason, whether the rank's weights stayed, the writes it published)."""
    sink = MemorySink()
    trainer = ShardedTrainer(ctx, SMALL_MODEL, ADAGRAD, sink)
    good, bad = itertools.islice(SyntheticStream(SMALL_STREAM).batches(256), 2)
    trainer.step(good)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    writes = len(sink.writes)
    dense = bad.dense.copy()
    dense[-1, 0] = np.inf
    result = trainer.step(dataclasses.replace(bad, dense=dense))
    stayed = all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True))
    return result.rejected, stayed, len(sink.writes) - writes


def _train_then_poison(ctx: RankContext, spec: ShardedRunSpec) -> tuple:
    return train_rank(ctx, spec), _poisoned_step(ctx)


@pytest.fixture(scope="module")
def two_ranks():
    spec = ShardedRunSpec(SMALL_MODEL, SMALL_STREAM, EVENTS, BATCH, ADAGRAD, return_sink=True,
                          placement=PARTS, partition_sink=_memory_sink)  # fmt: skip
    with ShardedRun(_train_then_poison, 2, (spec,), timeout_s=30) as run:
        return run.join()


@pytest.fixture(scope="module")
def one_rank():
    trainer = OnlineTrainer(DLRM(SMALL_MODEL), ADAGRAD)
    predictions, labels, seen = [], [], [set() for _ in range(SMALL_MODEL.num_sparse)]
    for events in itertools.islice(SyntheticStream(SMALL_STREAM).batches(BATCH), EVENTS // BATCH):
        predictions.append(trainer.step(events).predictions)
        labels.append(events.labels)
        for i, col in enumerate((events.sparse % SMALL_MODEL.rows_per_table).T):
            seen[i].update(col.tolist())
    return predictions, np.concatenate(labels), seen


def test_two_ranks_predict_as_the_one_rank_trainer(two_ranks, one_rank):
    two_ranks = [report for report, _ in two_ranks]
    predictions, labels, _ = one_rank
    sharded = [
        np.concatenate([r.predictions[s] for r in two_ranks]) for s in range(len(predictions))
    ]
    for step in range(3):  # the same math from the same seed: equal up to float order
        np.testing.assert_allclose(sharded[step], predictions[step], atol=1e-5)
    auc_one = auc(labels, np.concatenate(predictions))
    auc_two = auc(labels, np.concatenate(sharded))
    assert abs(auc_one - auc_two) <= 0.003, (auc_one, auc_two)
    # the dense arches are data-parallel replicas: identical on both ranks
    for key, value in two_ranks[0].dense.items():
        np.testing.assert_array_equal(value, two_ranks[1].dense[key])


def test_each_row_is_published_by_its_owner_to_its_partition(two_ranks, one_rank):
    two_ranks = [report for report, _ in two_ranks]
    _, _, seen = one_rank
    placement = RowPlacement(2, 16, PARTS, NAMES)
    assert [r.partitions for r in two_ranks] == [[0, 2], [1]]
    dense_at = {
        dense_table_name(k): int(PARTS.partition_of(dense_table_name(k), 0))
        for k in two_ranks[0].dense
    }
    # rank 0 writes to its partitions and to those holding a dense table; rank 1 to its own
    assert sorted(two_ranks[0].sink.sinks) == sorted({0, 2, *dense_at.values()})
    assert sorted(two_ranks[1].sink.sinks) == [1]
    for report in two_ranks:
        for sink in report.sink.sinks.values():  # every partition's source knows every table
            assert set(NAMES) | set(dense_at) <= set(sink.specs)
    for i, table in enumerate(NAMES):
        published = []
        for report in two_ranks:
            keys = report.owned_keys[i]
            assert (placement.owner(i, keys) == report.rank).all()
            for p, sink in report.sink.sinks.items():
                rows = sink.tables[table]
                got = np.array(sorted(rows), dtype=np.int64)
                if p not in report.partitions:
                    assert got.size == 0, f"rank {report.rank} wrote rows of partition {p}"
                    continue
                where = PARTS.partitions_of(table, 16)[shard_of(got, 16)]
                assert (where == p).all(), f"partition {p}'s sink got another partition's rows"
                local = np.searchsorted(keys, got)
                np.testing.assert_array_equal(np.stack([rows[k] for k in got.tolist()]),
                                              report.owned_rows[i][local])  # fmt: skip
                published.append(set(got.tolist()))
        assert sum(map(len, published)) == len(set().union(*published)), "a row published twice"
        assert set().union(*published) == seen[i], f"table {table}: ids seen, never published"
    for key, value in two_ranks[0].dense.items():
        name = dense_table_name(key)
        rows = two_ranks[0].sink.sinks[dense_at[name]].tables[name]
        np.testing.assert_array_equal(rows[0], value.reshape(-1))
    assert all(not rows for name, rows in two_ranks[1].sink.sinks[1].tables.items()
               if name in dense_at), "rank 1 published a dense tensor"  # fmt: skip


def test_a_non_finite_slice_on_one_rank_is_rejected_by_every_rank(two_ranks):
    # the inf is in rank 1's slice only; the all-reduced loss tells rank 0 too
    assert [poison for _, poison in two_ranks] == [("loss", True, 0), ("loss", True, 0)]


def test_a_killed_rank_makes_the_other_fail_naming_it():
    spec = ShardedRunSpec(SMALL_MODEL, SMALL_STREAM, events=10**8, batch_size=256,
                          keep_predictions=False)  # fmt: skip
    with ShardedRun(train_rank, 2, (spec,), timeout_s=10) as run:
        deadline = time.monotonic() + 60
        while run.step_of(1) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run.step_of(1) >= 3, "rank 1 never reached step 3"
        os.kill(run.pids[1], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(ShardedRunError) as failure:
            run.join(timeout_s=30)
    assert time.monotonic() - killed < 10, "the survivor waited out the timeout"
    named = f"rank 1 (pid {run.pids[1]}) was killed by signal SIGKILL"
    assert failure.value.dead[0].endswith("exited with code 1"), "rank 0 hung and was killed"
    assert failure.value.errors[0].startswith("RankLostError: rank 0: ")
    assert named in failure.value.errors[0]  # the survivor's own error names the dead rank
    assert str(failure.value).startswith(f"sharded run failed: {named}; rank 0 failed:")


def test_a_failed_collective_names_the_dead_peer_else_the_silent_one():
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    ranks = [RankContext(r, 4, store, dead_wait_s=0.05) for r in range(4)]
    for ctx, step in zip(ranks, (7, 7, 6, 7), strict=True):
        ctx.mark_step(step)
    ranks[1].lost(RuntimeError("timed out"), "the gradient exchange", 7)  # failed as rank 0
    error = ranks[0].lost(RuntimeError("Timed out waiting 5000ms\nmore"), "the exchange", 7)
    assert str(error) == (
        "rank 0: the exchange of step 7 failed: rank 2 is alive but did not answer (last "
        "started step 6); rank 3 is alive but did not answer (last started step 7) "
        "(RuntimeError: Timed out waiting 5000ms)"
    )
    store.set("dead/3", "(pid 42) was killed by signal SIGKILL")  # as the launcher records it
    error = ranks[0].lost(RuntimeError("Connection reset by peer"), "the exchange", 8)
    assert "failed: rank 3 (pid 42) was killed by signal SIGKILL (RuntimeError" in str(error)


def test_placement_and_trainer_refuse_bad_settings():
    with pytest.raises(ValueError, match="world_size"):
        RowPlacement(world_size=0)
    keys = np.arange(10_000)
    owners = [RowPlacement(world_size=3).owner(t, keys) for t in range(4)]
    assert all(set(o.tolist()) == {0, 1, 2} for o in owners)  # every rank owns rows of each
    with pytest.raises(ValueError, match=r"ranks 2\.\.2 would own no rows"):
        RowPlacement(3, 16, Placement(2), NAMES)
    partitioned = RowPlacement(2, 16, PARTS, NAMES)
    assert [partitioned.partitions_of_rank(r) for r in (0, 1)] == [[0, 2], [1]]
    owners = partitioned.owner(np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3))
    parts = [PARTS.partitions_of(NAMES[t], 16)[shard_of(np.arange(4), 16)] for t in range(3)]
    np.testing.assert_array_equal(owners, np.concatenate(parts) % 2)
    ctx = RankContext(0, 2, store=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be 'adagrad'"):
        ShardedTrainer(ctx, SMALL_MODEL, TrainerConfig(optimizer="adam"))
