"""A sharded trainer fed live batches: W ranks step on whatever a driving process sends them,
publishing to a partitioned cluster's sources, and send back what each step predicted.

Why apart from ``train_rank``: that one draws its own synthetic stream; an online loop
(``ekko demo --partitions 2``) decides what to train on as it goes — a batch is trained
after the replicas predicted it, with the labels it fed back — so the ranks read batches from
a queue each (every rank steps on the same batch, as ``ShardedTrainer.step`` needs) and
report their slice's predictions on a shared results queue.

Launch: ``ShardedRun(feed_rank, W, (FeedSpec(...), [queue per rank], results))`` with queues
of the ``spawn`` context; ``None`` on a rank's queue ends it (flushed: every row acknowledged
by its source).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ekko.store.placement import Placement
from ekko.store.spec import Sink
from ekko.train.dlrm import DLRMConfig
from ekko.train.publisher import PublisherConfig
from ekko.train.sharded import ShardedTrainer
from ekko.train.sharded_launch import RankContext
from ekko.train.sharded_publish import PartitionRouter
from ekko.train.sharded_quarantine import QuarantineStats
from ekko.train.trainer import TrainerConfig


@dataclass(frozen=True)
class FeedSpec:
    """What every rank of a fed run builds: the model, its optimizer, how it publishes, and
    the cluster it publishes to (``placement``; ``partition_sink(p)`` opens the sink to
    partition ``p``'s source, e.g. ``PartitionSources``)."""

    model: DLRMConfig
    placement: Placement
    partition_sink: Callable[[int], Sink]
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(optimizer="adagrad"))
    publisher: PublisherConfig = field(default_factory=PublisherConfig)


@dataclass(frozen=True)
class StepReport:
    """One rank's part of one step: its slice's pre-update predictions and labels, the batch
    size, the step's and its publish's wall time, and the rank's rollbacks so far (a
    dropped batch is ``rejected="quarantined"``)."""

    rank: int
    step: int
    events: int
    predictions: np.ndarray
    labels: np.ndarray
    step_time_s: float
    publish_time_s: float
    rejected: str | None
    quarantine: QuarantineStats | None = None


@dataclass
class FeedReport:
    """What one rank of a fed run ends with: its steps, its partitions, its rows (keys and
    weights per table, as ``RankReport``) and dense tensors at the end, and its rollbacks."""

    rank: int
    steps: int
    partitions: list[int]
    owned_keys: list[np.ndarray]
    owned_rows: list[np.ndarray]
    dense: dict[str, np.ndarray]
    quarantine: QuarantineStats | None = None


def feed_rank(ctx: RankContext, spec: FeedSpec, batches: Sequence[Any], results: Any) -> FeedReport:
    """The rank function: step on each ``Events`` of ``batches[rank]`` (a queue) until
    ``None``, put a ``StepReport`` per step on ``results``; publish rows to the rank's
    partitions' sources and, at rank 0, the dense tensors (once at the start too, so serving
    nodes can answer before the first batch arrives)."""
    trainer = ShardedTrainer(ctx, spec.model, spec.trainer, None, spec.publisher, spec.placement)
    parts = trainer.publish_partitions()
    router = PartitionRouter(spec.placement, {p: spec.partition_sink(p) for p in parts})
    trainer.publish_to(router)
    assert trainer.publisher is not None
    trainer.publisher.flush()  # tables created everywhere; rank 0's dense tensors published
    queue = batches[ctx.rank]
    steps = 0
    try:
        while (events := queue.get()) is not None:
            start = time.perf_counter()
            result = trainer.step(events)
            part = trainer.slice_of(len(events))
            results.put(
                StepReport(
                    rank=ctx.rank,
                    step=steps,
                    events=len(events),
                    predictions=result.predictions,
                    labels=np.asarray(events.labels[part]),
                    step_time_s=time.perf_counter() - start,
                    publish_time_s=result.publish_time_s,
                    rejected=result.rejected,
                    quarantine=trainer.quarantine_statistics(),
                )
            )
            steps += 1
        trainer.flush()
    finally:
        router.close()
    model = trainer.model
    return FeedReport(
        rank=ctx.rank,
        steps=steps,
        partitions=trainer.placement.partitions_of_rank(ctx.rank),
        owned_keys=model.owned_keys,
        owned_rows=[
            model.rows.weight.detach()[model.table_slice(i)].numpy().copy()
            for i in range(model.config.num_sparse)
        ],
        dense={k: v.numpy().copy() for k, v in model.state_dict().items() if k != "rows.weight"},
        quarantine=trainer.quarantine_statistics(),
    )
