"""Sharded online training: W ranks, embedding rows model parallel, dense layers data parallel.

Each rank holds only the rows it owns (``RowPlacement``: the store's shard of the key) and a
replica of the dense arches. A step takes the whole batch, and each rank its slice of events:
ids go to their owners and rows come back (``StepRoute``), the forward and backward run on the
slice, row gradients go back to the owners, which apply the same sparse Adagrad the 1-rank
``OnlineTrainer`` applies, and the dense gradients are summed over ranks (one ``all_reduce``,
equivalent to DDP). The loss of a slice is its summed BCE over the whole batch's size, so the
gradients are those of the 1-rank trainer's mean loss: the same math, seeded alike, up to
float summation order.

Each rank publishes the rows it owns that the step changed, rank 0 the dense tensors too,
with an ``EmbeddingPublisher`` over its local table: the table names, specs and dense pacing
are the 1-rank trainer's, and ``OwnedRowsSink`` turns local row numbers into (table, key).

On a partitioned cluster (``ShardedRunSpec.placement``, the cluster's ``Placement``) a
rank owns the rows of the partitions co-located with it (partition ``p`` is rank ``p % W``'s)
and publishes each row to its partition's source through a ``PartitionRouter``
(``ekko.train.sharded_publish``), rank 0 the dense tensors to the partitions holding them.

When the guard rolls the model back, the sources refuse the ranks' writes for a while; every
step starts with the ranks' agreement on it (``ekko.train.sharded_quarantine``), so all drop
their batches together, reload the restored rows and train on (``ekko.train.sharded_reload``).

Launch W ranks with ``ShardedRun(train_rank, W, (ShardedRunSpec(...),))``.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ekko.client.errors import Quarantined
from ekko.store.placement import Placement
from ekko.store.spec import Sink, TableSpec
from ekko.train.dlrm import DLRM, DLRMConfig, _DLRMHead, dense_table_name, embedding_table_name
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.sharded_exchange import RowPlacement, StepRoute
from ekko.train.sharded_launch import RankContext
from ekko.train.sharded_publish import OWNED_ROWS, OwnedRowsSink, PartitionRouter
from ekko.train.sharded_quarantine import (
    QuarantineConfig,
    QuarantineGate,
    QuarantineStats,
    SourceReader,
    reader_for,
)
from ekko.train.sharded_reload import drop_step, share_dense
from ekko.train.streams import Events, StreamConfig, SyntheticStream
from ekko.train.trainer import StepResult, TrainerConfig, _all_finite, publish_or_discard


class ShardedDLRM(_DLRMHead):
    """One rank's part of a DLRM: the dense arches and the rows it owns of every table.

    Why a head with one local table: the dense arches run the identical forward as
    ``DLRM``'s; the rows it owns of all tables are one ``nn.Embedding`` (``rows``, grouped by
    table, ``table_slice(i)`` holds table i's, ``owned_keys[i]`` their keys), taken from the
    seeded ``DLRM(config)``, so any world size starts from the 1-rank model's weights (each
    rank builds the full model once at start to take them: its init is one RNG stream over
    all tables). Adagrad updates each row alone, so one table for all is the same math.

    Args:
        config: model shape (hashed tables; dynamic tables are not sharded yet).
        placement: which rank owns which row.
        rank: this rank.
    """

    def __init__(self, config: DLRMConfig, placement: RowPlacement, rank: int) -> None:
        if config.dynamic is not None:
            raise ValueError(
                "sharded training supports hashed tables only: DLRMConfig.dynamic must be None"
            )
        full = DLRM(config)
        with torch.random.fork_rng(devices=[]):
            super().__init__(config)
        self.load_state_dict(full.dense_state(), strict=True)
        self.rank = rank
        n = config.rows_per_table
        every = np.arange(n, dtype=np.int64)
        self.owned_keys = [
            every[placement.owner(i, every) == rank] for i in range(config.num_sparse)
        ]
        sizes = [len(k) for k in self.owned_keys]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.table_of_row = np.repeat(np.arange(config.num_sparse, dtype=np.int64), sizes)
        self.key_of_row = np.concatenate(self.owned_keys)
        self._local_row = np.full(config.num_sparse * n, -1, dtype=np.int64)
        self._local_row[self.table_of_row * n + self.key_of_row] = np.arange(len(self.key_of_row))
        weights = [
            full.sparse.embedding_bags[embedding_table_name(i)].weight.detach()[torch.from_numpy(k)]
            for i, k in enumerate(self.owned_keys)
        ]
        self.rows = nn.Embedding.from_pretrained(torch.cat(weights), freeze=False, sparse=True)

    def table_slice(self, table: int) -> slice:
        """The local rows of ``table`` (its keys: ``owned_keys[table]``, in order)."""
        return slice(int(self.starts[table]), int(self.starts[table + 1]))

    def owned_rows(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows float32 [n, D] of ``codes`` (``table * rows_per_table + key``, all owned
        here) and their local row numbers. Looked up through ``rows`` with autograd on, so
        the publisher's hook records them."""
        local = self._local_row[codes.numpy()]
        if (local < 0).any():
            bad = codes.numpy()[local < 0][:5]
            raise RuntimeError(
                f"rank {self.rank} received ids it does not own (table * rows + key): "
                f"{bad.tolist()} (the ranks' placements differ)"
            )
        idx = torch.from_numpy(local)
        return self.rows(idx).detach(), idx

    def set_row_gradients(self, local: torch.Tensor, grads: torch.Tensor) -> None:
        """The sparse gradient of the local rows (the optimizer sums an id's gradients from
        the several ranks that looked it up)."""
        self.rows.weight.grad = torch.sparse_coo_tensor(
            local.unsqueeze(0), grads, self.rows.weight.shape, check_invariants=False
        )


class ShardedTrainer:
    """One rank of a sharded online trainer; every rank calls ``step`` with the same batch.

    Why its own trainer: the 1-rank ``OnlineTrainer`` owns whole tables; here the rows of a
    step come from and go back to other processes. It applies the 1-rank trainer's Adagrad
    (``TrainerConfig(optimizer="adagrad")``) and its reject rule for a non-finite loss or
    gradient (agreed by all ranks, so none steps alone); a step that makes a parameter
    non-finite is not undone here.

    Args:
        ctx: this rank (from ``ShardedRun``), after ``init_process_group``.
        model: the DLRM's shape.
        config: learning rates; ``optimizer`` must be ``"adagrad"``.
        sink: where this rank publishes its rows (rank 0 the dense tensors too); None trains
            only.
        publisher: table shards and dense pacing (``table_names`` and ``dense_prefix`` are
            set from ``model``).
        partitions: the cluster's placement: the rank owns the rows of its partitions
            (``RowPlacement``); None deals (table, shard) pairs round-robin over the ranks.
        quarantine: how the rank waits out a rollback (``ekko.train.sharded_quarantine``):
            every step starts with the ranks' agreement on it; a dropped batch's result is
            ``rejected="quarantined"``.
    """

    def __init__(
        self,
        ctx: RankContext,
        model: DLRMConfig,
        config: TrainerConfig | None = None,
        sink: Sink | None = None,
        publisher: PublisherConfig | None = None,
        partitions: Placement | None = None,
        quarantine: QuarantineConfig | None = None,
    ) -> None:
        self.ctx = ctx
        self.gate = QuarantineGate(ctx.rank, quarantine or QuarantineConfig())
        self.sink: Sink | None = None
        self.reader: SourceReader | None = None
        self.config = config or TrainerConfig(optimizer="adagrad")
        if self.config.optimizer != "adagrad":
            raise ValueError(
                f"sharded training applies the DLRM's sparse Adagrad: TrainerConfig.optimizer "
                f"must be 'adagrad', got {self.config.optimizer!r}"
            )
        self.pub_config = pub_config = publisher or PublisherConfig()
        ns = model.table_namespace
        self.table_names = [embedding_table_name(i, ns) for i in range(model.num_sparse)]
        self.placement = RowPlacement(
            ctx.world_size, pub_config.embedding_shards, partitions, tuple(self.table_names)
        )
        self.model = ShardedDLRM(model, self.placement, ctx.rank)
        self.sparse_optimizer = torch.optim.Adagrad(
            [self.model.rows.weight], lr=self.config.sparse_lr
        )
        self.dense_params = [p for n, p in self.model.named_parameters() if n != "rows.weight"]
        self.dense_optimizer = torch.optim.Adagrad(self.dense_params, lr=self.config.dense_lr)
        self.publisher: EmbeddingPublisher | None = None
        if sink is not None:
            self.publish_to(sink)
        self.steps = 0

    def dense_specs(self) -> list[TableSpec]:
        """The dense tensors' store tables (what rank 0 publishes)."""
        ns = self.model.config.table_namespace
        return [
            TableSpec(dense_table_name(k, ns), t.numel(), self.pub_config.dense_shards)
            for k, t in self.model.state_dict().items()
            if k != "rows.weight" and t.is_floating_point()
        ]

    def publish_partitions(self) -> list[int]:
        """The partitions this rank writes to on a partitioned cluster: those it owns and,
        at rank 0, those holding a shard of a dense table ([] when not partitioned)."""
        placement = self.placement.partitions
        if placement is None:
            return []
        parts = set(self.placement.partitions_of_rank(self.ctx.rank))
        if self.ctx.rank == 0:
            for spec in self.dense_specs():
                parts.update(placement.partitions_of(spec.name, spec.num_shards).tolist())
        return sorted(parts)

    def publish_to(self, sink: Sink) -> None:
        """Publish every step's rows (rank 0: and the dense tensors) into ``sink`` from now
        on. On a partitioned cluster every table, the dense ones too, is created at every
        partition this rank writes to: each source knows every table's spec."""
        if self.placement.partitions is not None:
            for spec in self.dense_specs():
                sink.create_table(spec)
        self.publisher = self._publisher(sink, self.pub_config)
        self.sink = sink
        dims = {name: self.model.config.embedding_dim for name in self.table_names}
        dims.update({spec.name: spec.dim for spec in self.dense_specs()})
        self.reader = reader_for(sink, dims, self.gate.config.max_request_bytes)

    def _publisher(self, sink: Sink, config: PublisherConfig) -> EmbeddingPublisher:
        model = self.model
        ns = model.config.table_namespace
        owned = OwnedRowsSink(sink, self.table_names, model.table_of_row, model.key_of_row)
        config = dataclasses.replace(
            config, table_names={"rows": OWNED_ROWS}, dense_prefix=dense_table_name("", ns)
        )
        # rank 0 publishes the dense tensors too; the others only their rows
        target = model if self.ctx.rank == 0 else nn.ModuleDict({"rows": model.rows})
        return EmbeddingPublisher(target, owned, config)

    def slice_of(self, n: int) -> slice:
        """This rank's events of a batch of ``n`` (contiguous, as even as can be)."""
        bounds = np.linspace(0, n, self.ctx.world_size + 1).astype(np.int64)
        return slice(int(bounds[self.ctx.rank]), int(bounds[self.ctx.rank + 1]))

    def step(self, events: Events) -> StepResult:
        """Train this rank's slice of ``events`` (the whole batch, the same on every rank);
        ``predictions`` are the slice's CTRs before learning, ``loss`` the whole batch's."""
        start = time.perf_counter()
        step = self.steps
        self.ctx.mark_step(step)
        cfg = self.model.config
        part = self.slice_of(len(events))
        held = getattr(self.sink, "quarantine", None)
        if held is not None:
            self.gate.saw(held)
        try:
            decision = self.gate.agree()
            if decision.resumed:
                share_dense(self)
        except RuntimeError as e:
            raise self.ctx.lost(e, "the rollback agreement", step) from e
        if not decision.train:
            return drop_step(self, len(events), part.stop - part.start, decision, start)
        if decision.resumed or held is not None:  # held: a late refusal of a handled rollback
            getattr(self.sink, "resume", lambda epoch: None)(self.gate.handled[0])
        dense = torch.from_numpy(np.ascontiguousarray(events.dense[part], dtype=np.float32))
        ids = np.asarray(events.sparse[part], dtype=np.int64) % cfg.rows_per_table
        labels = torch.from_numpy(np.ascontiguousarray(events.labels[part], dtype=np.float32))
        codes = (ids + np.arange(cfg.num_sparse, dtype=np.int64) * cfg.rows_per_table).ravel()
        self.model.train()
        try:
            route = StepRoute(codes, cfg.rows_per_table, self.placement)
            owned, local = self.model.owned_rows(route.recv_codes)
            rows = route.return_rows(owned).requires_grad_(True)
        except RuntimeError as e:
            raise self.ctx.lost(e, "the id and row exchange", step) from e
        embedded = rows[torch.from_numpy(route.inverse)].reshape(len(labels), cfg.num_sparse, -1)
        self.dense_optimizer.zero_grad(set_to_none=True)
        logits = self.model.logits(dense, embedded)
        loss_sum = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        predictions = torch.sigmoid(logits.detach()).numpy()
        (loss_sum / len(events)).backward()
        row_grads = rows.grad if rows.grad is not None else torch.zeros_like(rows)
        grads = [
            p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
            for p in self.dense_params
        ]
        bad_rows = 0.0 if _all_finite([row_grads]) else 1.0
        bucket = torch.cat([*grads, torch.tensor([float(loss_sum.detach()), bad_rows])])
        try:
            owned_grads = route.send_gradients(row_grads)
            dist.all_reduce(bucket)
        except RuntimeError as e:
            raise self.ctx.lost(e, "the gradient exchange", step) from e
        rejected = self._apply(bucket, local, owned_grads)
        publish_start = time.perf_counter()
        try:
            publish_or_discard(self.publisher, rejected)
        except Quarantined as q:  # every rank learns of it at the next step
            self.gate.saw(q)
        self.steps += 1
        end = time.perf_counter()
        return StepResult(
            loss=float(bucket[-2]) / len(events),
            predictions=predictions,
            step_time_s=end - start,
            publish_time_s=end - publish_start,
            rejected=rejected,
        )

    @torch.no_grad()
    def _apply(
        self, bucket: torch.Tensor, local: torch.Tensor, owned_grads: torch.Tensor
    ) -> str | None:
        """Optimizer steps from the summed gradients; the reject reason (the same on every
        rank: it is read from the all-reduced bucket) or None."""
        if not torch.isfinite(bucket[-2]):
            return "loss"
        offset = 0
        for p in self.dense_params:
            p.grad = bucket[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        if bucket[-1] > 0 or not _all_finite([bucket[:offset]]):
            return "gradient"
        self.model.set_row_gradients(local, owned_grads)
        self.sparse_optimizer.step()
        self.sparse_optimizer.zero_grad(set_to_none=True)
        self.dense_optimizer.step()
        return None

    def flush(self) -> None:
        """Publish pending rows and the dense tensors now (the end of a run)."""
        if self.publisher is not None and not self.gate.paused:
            try:
                self.publisher.flush()
            except Quarantined as q:
                self.gate.saw(q)

    def quarantine_statistics(self) -> QuarantineStats:
        """The rank's rollbacks: batches dropped, reloads, rows reloaded."""
        return self.gate.statistics()


@dataclass(frozen=True)
class ShardedRunSpec:
    """A sharded training run over a synthetic stream, as every rank runs it.

    ``sink`` builds each rank's sink from its rank (a picklable callable, e.g. one opening a
    ``RemoteSink`` to the rank's source; None trains only), flushed and closed at the end
    when it has those methods; ``return_sink`` puts it in the report instead (a ``MemorySink``
    in tests). ``keep_predictions``
    keeps each step's predictions of the rank's slice. ``pregenerate`` draws every batch
    before the first step, so a throughput figure counts training only (a real rank reads
    its slice of the event log; here each rank would draw the whole synthetic batch).

    On a partitioned cluster ``placement`` is its ``Placement`` and ``partition_sink`` opens
    the sink to a partition's source (``PartitionSources``); each rank publishes through a
    ``PartitionRouter`` over the sinks of ``ShardedTrainer.publish_partitions()`` (``sink`` is
    then unused).
    """

    model: DLRMConfig
    stream: StreamConfig
    events: int
    batch_size: int = 512
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(optimizer="adagrad"))
    publisher: PublisherConfig = field(default_factory=PublisherConfig)
    sink: Callable[[int], Sink] | None = None
    return_sink: bool = False
    keep_predictions: bool = True
    pregenerate: bool = False
    placement: Placement | None = None
    partition_sink: Callable[[int], Sink] | None = None
    quarantine: QuarantineConfig = field(default_factory=QuarantineConfig)

    def __post_init__(self) -> None:
        if (self.placement is None) != (self.partition_sink is None):
            raise ValueError(
                "ShardedRunSpec: placement and partition_sink go together (a partitioned "
                "cluster's placement and the sink to each partition's source)"
            )


@dataclass
class RankReport:
    """What one rank did: its slices' predictions per step, its rows and dense weights at the
    end, its published sink if asked, and the wall and CPU time (all its threads) of the
    steps after the first."""

    rank: int
    partitions: list[int]
    predictions: list[np.ndarray]
    losses: list[float]
    owned_keys: list[np.ndarray]
    owned_rows: list[np.ndarray]
    dense: dict[str, np.ndarray]
    sink: Sink | None
    quarantine: QuarantineStats
    steps: int
    events_after_first: int
    seconds_after_first: float
    cpu_seconds_after_first: float


def train_rank(ctx: RankContext, spec: ShardedRunSpec) -> RankReport:
    """The rank function of a sharded run (``ShardedRun(train_rank, W, (spec,))``)."""
    sink: Sink | None = None
    if spec.placement is None:
        sink = spec.sink(ctx.rank) if spec.sink is not None else None
    trainer = ShardedTrainer(
        ctx, spec.model, spec.trainer, sink, spec.publisher, spec.placement, spec.quarantine
    )
    if spec.placement is not None and spec.partition_sink is not None:
        parts = trainer.publish_partitions()
        sink = PartitionRouter(spec.placement, {p: spec.partition_sink(p) for p in parts})
        trainer.publish_to(sink)
    steps = max(1, spec.events // spec.batch_size)
    batches = itertools.islice(SyntheticStream(spec.stream).batches(spec.batch_size), steps)
    if spec.pregenerate:
        batches = iter(list(batches))
    predictions, losses = [], []
    started = cpu_started = 0.0
    for i, events in enumerate(batches):
        if i == 1:
            dist.barrier()
            started, cpu_started = time.perf_counter(), time.process_time()
        result = trainer.step(events)
        losses.append(result.loss)
        if spec.keep_predictions:
            predictions.append(result.predictions)
    elapsed = time.perf_counter() - started if steps > 1 else 0.0
    cpu = time.process_time() - cpu_started if steps > 1 else 0.0
    trainer.flush()
    for end in ("flush", "close"):  # a RemoteSink: every row acknowledged, its threads ended
        call = getattr(sink, end, None)
        if callable(call) and not spec.return_sink:
            try:
                call()
            except Quarantined as q:  # a run ending paused: its dropped rows are counted
                trainer.gate.saw(q)
    model = trainer.model
    return RankReport(
        rank=ctx.rank,
        partitions=trainer.placement.partitions_of_rank(ctx.rank),
        predictions=predictions,
        losses=losses,
        owned_keys=model.owned_keys,
        owned_rows=[
            model.rows.weight.detach()[model.table_slice(i)].numpy().copy()
            for i in range(model.config.num_sparse)
        ],
        dense={k: v.numpy().copy() for k, v in model.state_dict().items() if k != "rows.weight"},
        sink=sink if spec.return_sink else None,
        quarantine=trainer.quarantine_statistics(),
        steps=steps,
        events_after_first=(steps - 1) * spec.batch_size,
        seconds_after_first=elapsed,
        cpu_seconds_after_first=cpu,
    )
