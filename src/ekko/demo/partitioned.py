"""``ekko demo --partitions P``: the partitioned form of the demo (issue 17).

The model's rows are spread over P partitions in every DC (a source per partition in the
training DC, a holder of each partition in each inference DC, each serving ``predict`` by
scatter-gather: the partitions it lacks read from their holders in its DC). Nothing trains
in-node (a partitioned source does not: ``NodeRunner.trains_in_node``); the sharded trainer
does — ``ranks`` processes under ``torch.distributed``, rank r owning the partitions
p % ranks == r and publishing their rows to those partitions' sources, rank 0 the dense
tensors. ``ShardedFeed`` is that trainer as the demo's loop sees it: each batch is trained
after the replicas predicted it, with the labels fed back, as the single-partition demo's
trainer at the source is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing as mp
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ekko.node.config import ClusterConfig, ModelConfig
from ekko.quality.windowed import WindowedQuality
from ekko.train.publisher import PublisherConfig
from ekko.train.sharded_feed import FeedReport, FeedSpec, StepReport, feed_rank
from ekko.train.sharded_launch import ShardedRun
from ekko.train.sharded_publish import PartitionSources
from ekko.train.sharded_quarantine import QuarantineStats
from ekko.train.streams import Events
from ekko.train.trainer import TrainerConfig

QUALITY_WINDOW_S = 60.0  # as the in-node trainer's own windowed quality


class ShardedFeed:
    """The sharded trainer of a partitioned demo cluster, fed batch by batch.

    Why a feed and not ``train_rank``: the demo's loop decides what is trained and when (a
    batch after its predictions, labels possibly poisoned); the ranks step on what it sends
    (one queue per rank, every rank the same batch). ``report()`` has the keys of the
    in-node trainer's ``GET /v1/models/{m}/train`` the demo reads (events, queued,
    publish_share, window and lifetime quality of the pre-update predictions, failed).

    Args:
        config: the cluster (partitioned), read from ``config_path``.
        model: the ``[[models]]`` entry trained (hashed tables; Adagrad).
        ranks: rank processes (at most the partition count).
        depth: batches queued per rank before ``submit`` waits.
    """

    def __init__(
        self,
        config: ClusterConfig,
        config_path: Path,
        model: ModelConfig,
        ranks: int = 2,
        depth: int = 8,
    ) -> None:
        sources = {p: config.source_of(p).name for p in range(config.cluster.partitions)}
        spec = FeedSpec(
            model=model.dlrm(),
            placement=config.placement(),
            partition_sink=PartitionSources(Path(config_path), sources),
            trainer=TrainerConfig("adagrad", model.sparse_lr, model.dense_lr),
            publisher=PublisherConfig(
                embedding_shards=model.embedding_shards, dense_interval_s=model.dense_interval_s
            ),
        )
        ctx = mp.get_context("spawn")
        self.ranks = ranks
        self.queues = [ctx.Queue(maxsize=depth) for _ in range(ranks)]
        self.results = ctx.Queue()
        self._lock = threading.Lock()
        self.quality = WindowedQuality(QUALITY_WINDOW_S)
        self.events = 0
        self.submitted = 0
        self._step_s = self._publish_s = 0.0
        self.rejected = 0
        self.quarantine: dict[int, QuarantineStats] = {}  # each rank's latest
        self.batches = 0  # submitted; a rank's step number is its batch's place
        self._first_flipped: int | None = None  # the first batch with labels not the stream's
        self.flipped_trained_at: float | None = None  # wall time rank 0 stepped on it
        self.run = ShardedRun(feed_rank, ranks, (spec, self.queues, self.results), timeout_s=120)
        self._drainer = threading.Thread(target=self._drain, name="sharded-feed", daemon=True)
        self._drainer.start()

    def _drain(self) -> None:
        while (r := self.results.get()) is not None:
            self._take(r)

    def _take(self, r: StepReport) -> None:
        now = time.monotonic()
        finite = np.isfinite(r.predictions)
        with self._lock:
            if r.rejected is None:
                self.quality.update(r.predictions[finite], r.labels[finite], now)
            if r.quarantine is not None:
                self.quarantine[r.rank] = r.quarantine
            if r.rank == 0 and r.step == self._first_flipped and self.flipped_trained_at is None:
                self.flipped_trained_at = time.time()
            if r.rank == 0:
                self.events += r.events
                self._step_s += r.step_time_s
                self._publish_s += r.publish_time_s
                self.rejected += r.rejected is not None

    async def submit(self, events: Events, labels: np.ndarray) -> bool:
        """Queue ``events`` with ``labels`` on every rank (waits while the ranks are
        behind); False once a rank died (the loop counts the batch refused). The first
        batch whose labels are not the stream's (a poison) is noted: ``flipped_trained_at``
        says when the ranks trained on it, seconds after the loop queued it when they are
        behind."""
        labels = np.asarray(labels, dtype=events.labels.dtype)
        if self._first_flipped is None and not np.array_equal(labels, events.labels):
            self._first_flipped = self.batches
        self.batches += 1
        batch = dataclasses.replace(events, labels=labels)
        for q in self.queues:
            if not await asyncio.to_thread(self._put, q, batch):
                return False
        self.submitted += len(events)
        return True

    def _put(self, q: Any, item: Any) -> bool:
        """Put ``item`` on a rank's queue, waiting while it is full; False once a rank died
        (a dead rank's queue never empties)."""
        while not self.run.dead:
            try:
                q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def reset_quality(self) -> None:
        """Start the quality afresh (after the warm-up)."""
        with self._lock:
            self.quality = WindowedQuality(QUALITY_WINDOW_S)

    def report(self) -> dict[str, Any]:
        """The trainer's counters as the demo reads them; ``paused`` (a rank waits out a
        rollback's quarantine or reloads) is what the source's ``training_paused`` is to the
        single-partition form, ``quarantine`` each rank's rollbacks (batches dropped,
        reloads, rows reloaded)."""
        now = time.monotonic()
        with self._lock:
            ranks = self.quarantine
            return {
                "ranks": self.ranks,
                "events": self.events,
                "queued": max(0, self.submitted - self.events),
                "publish_share": self._publish_s / self._step_s if self._step_s else None,
                "rejected_steps": self.rejected,
                "window": self.quality.compute(now).as_json(),
                "lifetime": self.quality.lifetime(now).as_json(),
                "failed": "; ".join(f"rank {r} {t}" for r, t in self.run.dead.items()) or None,
                "paused": any(q.paused for q in ranks.values()),
                "flipped_labels_trained_at": self.flipped_trained_at,
                "quarantine": {str(r): dataclasses.asdict(q) for r, q in sorted(ranks.items())},
            }

    def close(self, timeout_s: float = 60.0) -> list[FeedReport]:
        """End the ranks (every row they published acknowledged by its source); what each
        ended with. ``ShardedRunError`` names a rank that failed."""
        try:
            for q in self.queues:
                self._put(q, None)
            return self.run.join(timeout_s=timeout_s)
        finally:
            self.results.put(None)
            self._drainer.join(5.0)
