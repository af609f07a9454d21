"""A sharded rank's steps during a rollback (``ekko.train.sharded_quarantine``): batches
dropped, then the weights back to what the store holds — its owned rows of every table (and
at rank 0 the dense tensors) read from its partitions' sources, Adagrad state reset for every
row that changed, and the dense tensors made equal on every rank.

Why a row the store lacks goes back to its initial value: the store holds every row the
ranks published; one it lacks was never published (never trained, or trained only in steps
whose rows were dropped) or was created after the healthy point (the restore deleted it),
so the seeded initial value is the one the store's readers assume.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from ekko.train.dlrm import DLRM, dense_table_name
from ekko.train.sharded_quarantine import Decision, ReloadFailed, SourceReader
from ekko.train.trainer import StepResult

if TYPE_CHECKING:
    from ekko.train.sharded import ShardedTrainer


def dense_tables(trainer: ShardedTrainer) -> dict[str, str]:
    """Store table -> state-dict key of each dense tensor."""
    ns = trainer.model.config.table_namespace
    return {
        dense_table_name(k, ns): k
        for k, t in trainer.model.state_dict().items()
        if k != "rows.weight" and t.is_floating_point()
    }


def _initial(trainer: ShardedTrainer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The rank's owned rows and the dense tensors as the seeded model starts them."""
    model = trainer.model
    full = DLRM(model.config)  # its init forks the RNG: training's stream is untouched
    bags = full.sparse.embedding_bags
    names = list(bags)
    rows = torch.cat(
        [
            bags[names[i]].weight.detach()[torch.from_numpy(k)]
            for i, k in enumerate(model.owned_keys)
        ]
    )
    return rows, full.dense_state()


@torch.no_grad()
def reload_weights(trainer: ShardedTrainer, reader: SourceReader) -> int:
    """Set the rank's owned rows (rank 0: and the dense tensors) to what the sources hold;
    reset the Adagrad sums of the rows that changed. Returns how many rows changed.
    ``ReloadFailed`` (nothing changed) when a source cannot be read."""
    model = trainer.model
    wanted = {
        name: keys for name, keys in zip(trainer.table_names, model.owned_keys, strict=True)
        if keys.shape[0]
    }  # fmt: skip
    dense = dense_tables(trainer) if trainer.ctx.rank == 0 else {}
    wanted.update({name: np.zeros(1, np.int64) for name in dense})
    got = reader.read(wanted)  # everything read before anything changes
    initial = None
    if not all(found.all() for _, found in got.values()):
        initial = _initial(trainer)
    weight = model.rows.weight
    new = weight.detach().clone()
    for i, name in enumerate(trainer.table_names):
        if name not in got:
            continue
        values, found = got[name]
        part = new[model.table_slice(i)]
        if initial is not None:
            part.copy_(initial[0][model.table_slice(i)])
        mask = torch.from_numpy(found)
        part[mask] = torch.from_numpy(values[found]).to(part.dtype)
    changed = (new != weight).any(dim=1)
    weight.copy_(new)
    state = trainer.sparse_optimizer.state.get(weight)
    if state and "sum" in state:
        init = trainer.sparse_optimizer.param_groups[0]["initial_accumulator_value"]
        state["sum"][changed] = init
    tensors = model.state_dict()
    for name, key in dense.items():
        values, found = got[name]
        if found[0]:
            row = torch.from_numpy(values[0])
        else:
            assert initial is not None
            row = initial[1][key].reshape(-1)
        if row.numel() != tensors[key].numel():
            raise ValueError(
                f"table {name!r}: a row of {row.numel()} values for a tensor of shape "
                f"{tuple(tensors[key].shape)}: the model's shape differs from the one that "
                f"wrote it"
            )
        tensors[key].copy_(row.reshape(tensors[key].shape).to(tensors[key].dtype))
    return int(changed.sum())


@torch.no_grad()
def share_dense(trainer: ShardedTrainer) -> None:
    """Every rank's dense tensors := rank 0's (one broadcast: a collective), and a fresh
    dense optimizer on every rank: the replicas go on from identical states."""
    keys = set(dense_tables(trainer).values())
    tensors = [t for k, t in trainer.model.state_dict().items() if k in keys]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.broadcast(flat, src=0)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    trainer.dense_optimizer = torch.optim.Adagrad(trainer.dense_params, lr=trainer.config.dense_lr)


def drop_step(
    trainer: ShardedTrainer, events: int, mine: int, decision: Decision, start: float
) -> StepResult:
    """A batch of ``events`` (``mine`` in this rank's slice) dropped during a rollback: on
    entering, the pending rows are forgotten and the sinks held (their queued writes
    dropped); once the quarantine is over, the reload is tried (again after a backoff)."""
    gate = trainer.gate
    if decision.entered is not None:
        if trainer.publisher is not None:
            trainer.publisher.discard()
        getattr(trainer.sink, "hold", lambda q: None)(decision.entered)
    gate.dropped(events)
    if decision.reload_due and gate.try_now():
        try:
            if trainer.reader is None:
                raise ReloadFailed("this rank's sink cannot be read back (no lookup_many)")
            gate.reload_done(reload_weights(trainer, trainer.reader))
        except (ReloadFailed, ValueError) as e:
            gate.reload_failed(e)
    trainer.steps += 1
    return StepResult(
        loss=float("nan"),
        predictions=np.full(mine, np.nan, np.float32),
        step_time_s=time.perf_counter() - start,
        publish_time_s=0.0,
        rejected="quarantined",
    )
