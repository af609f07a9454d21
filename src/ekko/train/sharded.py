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
with an ``EmbeddingPublisher`` over its local tables: the table names, specs and dense pacing
are the 1-rank trainer's, and ``OwnedKeysSink`` turns the local row numbers into store keys.

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

from ekko.store.spec import Sink, TableSpec
from ekko.train.dlrm import DLRM, DLRMConfig, _DLRMHead, dense_table_name, embedding_table_name
from ekko.train.publisher import EmbeddingPublisher, PublisherConfig
from ekko.train.sharded_exchange import RowPlacement, StepRoute
from ekko.train.sharded_launch import RankContext
from ekko.train.streams import Events, StreamConfig, SyntheticStream
from ekko.train.trainer import StepResult, TrainerConfig, _all_finite


class OwnedKeysSink:
    """A ``Sink`` that writes a rank's local row numbers as the store keys they hold.

    Why: a rank's table holds only its own rows, numbered 0..n-1; the publisher reports those
    numbers, the store is keyed by the model's row keys (``owned_keys[table][row]``).
    """

    def __init__(self, sink: Sink, owned_keys: dict[str, np.ndarray]) -> None:
        self.sink = sink
        self.owned_keys = owned_keys

    def create_table(self, spec: TableSpec) -> None:
        self.sink.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        owned = self.owned_keys.get(table)
        self.sink.write(table, keys if owned is None else owned[keys], values)


class ShardedDLRM(_DLRMHead):
    """One rank's part of a DLRM: the dense arches and the rows of every table it owns.

    Why a head with local tables: the dense arches run the identical forward as ``DLRM``'s;
    the rows are the slices ``owned_keys[i]`` of the seeded ``DLRM(config)``'s tables, so any
    world size starts from the 1-rank model's weights (each rank builds the full model once
    at start to take them: its init is one RNG stream over all tables).

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
        self.tables = nn.ModuleDict()
        self.owned_keys: list[np.ndarray] = []
        self._local_row: list[np.ndarray] = []
        every = np.arange(config.rows_per_table, dtype=np.int64)
        for i in range(config.num_sparse):
            keys = every[placement.owner(i, every) == rank]
            name = embedding_table_name(i)
            rows = full.sparse.embedding_bags[name].weight.detach()[torch.from_numpy(keys)]
            self.tables[name] = nn.Embedding.from_pretrained(rows, freeze=False, sparse=True)
            local = np.full(config.rows_per_table, -1, dtype=np.int64)
            local[keys] = np.arange(len(keys))
            self.owned_keys.append(keys)
            self._local_row.append(local)

    def owned_rows(self, codes: torch.Tensor) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Rows float32 [n, D] of ``codes`` (``table * rows_per_table + key``, all owned
        here), and per table the positions in ``codes`` of its ids. Looked up through the
        tables with autograd on, so the publisher's hooks record them."""
        rows_per_table = self.config.rows_per_table
        c = codes.numpy()
        tables, keys = c // rows_per_table, c % rows_per_table
        perm = np.argsort(tables, kind="stable")
        bounds = np.searchsorted(tables[perm], np.arange(self.config.num_sparse + 1))
        out = torch.empty((len(c), self.config.embedding_dim))
        positions = []
        for i, table in enumerate(self.tables.values()):
            pos = perm[bounds[i] : bounds[i + 1]]
            positions.append(pos)
            if not pos.size:
                continue
            local = self._local_row[i][keys[pos]]
            if (local < 0).any():
                raise RuntimeError(
                    f"rank {self.rank} received ids of table {i} it does not own: "
                    f"{keys[pos][local < 0][:5].tolist()} (the ranks' placements differ)"
                )
            out[torch.from_numpy(pos)] = table(torch.from_numpy(local)).detach()
        return out, positions

    def set_row_gradients(
        self, codes: torch.Tensor, positions: list[np.ndarray], grads: torch.Tensor
    ) -> None:
        """Give each table the sparse gradient of its rows (summed by the optimizer where
        several ranks looked the same id up)."""
        keys = codes.numpy() % self.config.rows_per_table
        for i, table in enumerate(self.tables.values()):
            pos = positions[i]
            if not pos.size:
                table.weight.grad = None
                continue
            local = torch.from_numpy(self._local_row[i][keys[pos]]).unsqueeze(0)
            table.weight.grad = torch.sparse_coo_tensor(
                local, grads[torch.from_numpy(pos)], table.weight.shape
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
    """

    def __init__(
        self,
        ctx: RankContext,
        model: DLRMConfig,
        config: TrainerConfig | None = None,
        sink: Sink | None = None,
        publisher: PublisherConfig | None = None,
    ) -> None:
        self.ctx = ctx
        self.config = config or TrainerConfig(optimizer="adagrad")
        if self.config.optimizer != "adagrad":
            raise ValueError(
                f"sharded training applies the DLRM's sparse Adagrad: TrainerConfig.optimizer "
                f"must be 'adagrad', got {self.config.optimizer!r}"
            )
        pub_config = publisher or PublisherConfig()
        self.placement = RowPlacement(ctx.world_size, pub_config.embedding_shards)
        self.model = ShardedDLRM(model, self.placement, ctx.rank)
        self.sparse_optimizer = torch.optim.Adagrad(
            list(self.model.tables.parameters()), lr=self.config.sparse_lr
        )
        self.dense_params = [
            p for n, p in self.model.named_parameters() if not n.startswith("tables.")
        ]
        self.dense_optimizer = torch.optim.Adagrad(self.dense_params, lr=self.config.dense_lr)
        self.publisher = None if sink is None else self._publisher(sink, pub_config)
        self.steps = 0

    def _publisher(self, sink: Sink, config: PublisherConfig) -> EmbeddingPublisher:
        ns = self.model.config.table_namespace
        names = {name: ns + name for name in self.model.tables}
        keys = {
            ns + name: k for name, k in zip(self.model.tables, self.model.owned_keys, strict=True)
        }
        owned_sink = OwnedKeysSink(sink, keys)
        dense_prefix = dense_table_name("", ns)
        if self.ctx.rank == 0:
            table_names = {f"tables.{name}": store for name, store in names.items()}
            config = dataclasses.replace(config, table_names=table_names, dense_prefix=dense_prefix)
            return EmbeddingPublisher(self.model, owned_sink, config)
        config = dataclasses.replace(config, table_names=names, dense_prefix=dense_prefix)
        return EmbeddingPublisher(self.model.tables, owned_sink, config)

    def _slice(self, n: int) -> slice:
        bounds = np.linspace(0, n, self.ctx.world_size + 1).astype(np.int64)
        return slice(int(bounds[self.ctx.rank]), int(bounds[self.ctx.rank + 1]))

    def step(self, events: Events) -> StepResult:
        """Train this rank's slice of ``events`` (the whole batch, the same on every rank);
        ``predictions`` are the slice's CTRs before learning, ``loss`` the whole batch's."""
        start = time.perf_counter()
        step = self.steps
        self.ctx.mark_step(step)
        cfg = self.model.config
        part = self._slice(len(events))
        dense = torch.from_numpy(np.ascontiguousarray(events.dense[part], dtype=np.float32))
        ids = np.asarray(events.sparse[part], dtype=np.int64) % cfg.rows_per_table
        labels = torch.from_numpy(np.ascontiguousarray(events.labels[part], dtype=np.float32))
        codes = (ids + np.arange(cfg.num_sparse, dtype=np.int64) * cfg.rows_per_table).ravel()
        self.model.train()
        try:
            route = StepRoute(codes, cfg.rows_per_table, self.placement)
            owned, positions = self.model.owned_rows(route.recv_codes)
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
        rejected = self._apply(bucket, route.recv_codes, positions, owned_grads)
        publish_start = time.perf_counter()
        if self.publisher is not None:
            if rejected is None:
                self.publisher.publish()
            else:
                self.publisher.discard()
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
        self,
        bucket: torch.Tensor,
        codes: torch.Tensor,
        positions: list[np.ndarray],
        owned_grads: torch.Tensor,
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
        self.model.set_row_gradients(codes, positions, owned_grads)
        self.sparse_optimizer.step()
        self.sparse_optimizer.zero_grad(set_to_none=True)
        self.dense_optimizer.step()
        return None

    def flush(self) -> None:
        """Publish pending rows and the dense tensors now (the end of a run)."""
        if self.publisher is not None:
            self.publisher.flush()


@dataclass(frozen=True)
class ShardedRunSpec:
    """A sharded training run over a synthetic stream, as every rank runs it.

    ``sink`` builds each rank's sink from its rank (a picklable callable; None trains only);
    ``return_sink`` puts it in the report (a ``MemorySink`` in tests). ``keep_predictions``
    keeps each step's predictions of the rank's slice.
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


@dataclass
class RankReport:
    """What one rank did: its slices' predictions per step, its rows and dense weights at the
    end, its published sink if asked, and the wall time of the steps after the first."""

    rank: int
    predictions: list[np.ndarray]
    losses: list[float]
    owned_keys: list[np.ndarray]
    owned_rows: list[np.ndarray]
    dense: dict[str, np.ndarray]
    sink: Sink | None
    steps: int
    events_after_first: int
    seconds_after_first: float


def train_rank(ctx: RankContext, spec: ShardedRunSpec) -> RankReport:
    """The rank function of a sharded run (``ShardedRun(train_rank, W, (spec,))``)."""
    sink = spec.sink(ctx.rank) if spec.sink is not None else None
    trainer = ShardedTrainer(ctx, spec.model, spec.trainer, sink, spec.publisher)
    steps = max(1, spec.events // spec.batch_size)
    batches = itertools.islice(SyntheticStream(spec.stream).batches(spec.batch_size), steps)
    predictions, losses = [], []
    started = 0.0
    for i, events in enumerate(batches):
        if i == 1:
            dist.barrier()
            started = time.perf_counter()
        result = trainer.step(events)
        losses.append(result.loss)
        if spec.keep_predictions:
            predictions.append(result.predictions)
    elapsed = time.perf_counter() - started if steps > 1 else 0.0
    trainer.flush()
    model = trainer.model
    return RankReport(
        rank=ctx.rank,
        predictions=predictions,
        losses=losses,
        owned_keys=model.owned_keys,
        owned_rows=[t.weight.detach().numpy().copy() for t in model.tables.values()],
        dense={k: v.numpy().copy() for k, v in model.state_dict().items() if "tables." not in k},
        sink=sink if spec.return_sink else None,
        steps=steps,
        events_after_first=(steps - 1) * spec.batch_size,
        seconds_after_first=elapsed,
    )
