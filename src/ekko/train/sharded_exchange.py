"""Row-wise placement of embedding rows over ranks, and the exchanges of one sharded step.

As TorchRec's row-wise sharding (``torchrec/distributed/sharding/rw_sharding.py``): every rank
buckets the ids of its slice of the batch by owning rank and sends them there with one
``all_to_all`` (TorchRec's ``KJTAllToAll``); owners look their rows up and send them back
(one more ``all_to_all``); after the backward pass the rows' gradients take the reverse path
to their owners, which apply the optimizer to their rows only. Unlike TorchRec's row-wise
sharding, which places contiguous row blocks and reduce-scatters pooled sums, the owner of a
row is the store's shard of its key (a partition is then a set of shards, the same for the
trainer and the parameter servers), and since every bag holds one id the rows themselves
travel back, deduplicated per rank, as TorchRec's sequence (``EmbeddingCollection``) sharding.

gloo implements ``all_to_all_single`` with uneven splits on CPU (checked with torch 2.13), so
no ``all_gather`` fallback is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from ekko.store import shard_of
from ekko.store.placement import Placement


@dataclass(frozen=True, eq=False)
class RowPlacement:
    """Which rank owns the row of (table, key): the store's shard of the key, then the
    (table, shard) pair's rank.

    Why the store's shard: the publisher writes a row into shard ``shard_of(key, num_shards)``
    of its table, so every row a rank owns falls in shards that rank owns wholly; a partition
    of the store (a set of shards) can live beside the rank that writes it.

    Without ``partitions`` the (table, shard) pairs are dealt round-robin over the ranks.
    With a cluster's ``Placement`` (``partitions``) and the tables' store names (``tables``,
    feature order) a pair belongs to the partition the cluster puts it in, and partition
    ``p`` to rank ``p % world_size``: each rank owns the rows of the partitions co-located
    with it and publishes them to those partitions' sources. Every rank then owns at least
    one partition, so ``world_size`` may not exceed the partition count.

    ``num_shards`` is the tables' shard count (``PublisherConfig.embedding_shards``).
    """

    world_size: int
    num_shards: int = 16
    partitions: Placement | None = None
    tables: tuple[str, ...] = ()
    _owners: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"RowPlacement.world_size must be >= 1, got {self.world_size}")
        if self.num_shards < 1:
            raise ValueError(f"RowPlacement.num_shards must be >= 1, got {self.num_shards}")
        if self.partitions is None:
            return
        count = self.partitions.partitions
        if self.world_size > count:
            raise ValueError(
                f"{self.world_size} ranks over {count} partitions: rank r owns the partitions "
                f"p with p % {self.world_size} == r, so ranks {count}..{self.world_size - 1} "
                f"would own no rows; run at most {count} ranks"
            )
        if not self.tables:
            raise ValueError("RowPlacement.tables: the tables' store names, one per feature")
        owners = np.stack([self.partitions.partitions_of(t, self.num_shards) for t in self.tables])
        object.__setattr__(self, "_owners", owners % self.world_size)

    def partitions_of_rank(self, rank: int) -> list[int]:
        """The partitions ``rank`` owns (``p % world_size == rank``); [] without partitions."""
        if self.partitions is None:
            return []
        return [p for p in range(self.partitions.partitions) if p % self.world_size == rank]

    def owner(self, table: int | np.ndarray, keys: np.ndarray) -> np.ndarray:
        """Owning rank (int64 [n]) of each key of ``table`` (the feature index: one for all
        keys, or one per key)."""
        shards = shard_of(np.asarray(keys, dtype=np.int64), self.num_shards)
        table = np.asarray(table, dtype=np.int64)
        if self._owners is not None:
            return self._owners[table, shards]
        return (table * self.num_shards + shards) % self.world_size


class StepRoute:
    """Where the ids of one rank's batch slice go and where the ids it owns came from.

    Built from the slice's ids (``codes``: ``table * rows_per_table + key``, one per event and
    feature); holds the deduplicated ids in owner order and the split sizes every later
    exchange of the step reuses, so ids, rows and gradients travel in the same order.
    """

    def __init__(self, codes: np.ndarray, rows_per_table: int, placement: RowPlacement) -> None:
        world = placement.world_size
        uniq, self.inverse = np.unique(codes, return_inverse=True)
        owners = placement.owner(uniq // rows_per_table, uniq % rows_per_table)
        self.order = np.argsort(owners, kind="stable")
        self.send_codes = torch.from_numpy(uniq[self.order])
        self.send_counts = np.bincount(owners, minlength=world).astype(np.int64)
        recv_counts = torch.empty(world, dtype=torch.int64)
        dist.all_to_all_single(recv_counts, torch.from_numpy(self.send_counts))
        self.recv_counts = recv_counts.numpy()
        self.recv_codes = torch.empty(int(self.recv_counts.sum()), dtype=torch.int64)
        dist.all_to_all_single(
            self.recv_codes,
            self.send_codes,
            self.recv_counts.tolist(),
            self.send_counts.tolist(),
        )

    @property
    def num_unique(self) -> int:
        """Distinct (table, key) ids of this rank's slice."""
        return len(self.order)

    def return_rows(self, owned_rows: torch.Tensor) -> torch.Tensor:
        """Owners send the rows of ``recv_codes`` back; float32 [num_unique, D] in the order of
        the slice's unique ids (``inverse`` indexes it per event and feature)."""
        got = torch.empty((self.num_unique, owned_rows.shape[1]), dtype=owned_rows.dtype)
        dist.all_to_all_single(
            got, owned_rows.contiguous(), self.send_counts.tolist(), self.recv_counts.tolist()
        )
        rows = torch.empty_like(got)
        rows[torch.from_numpy(self.order)] = got
        return rows

    def send_gradients(self, grads: torch.Tensor) -> torch.Tensor:
        """The reverse of ``return_rows``: gradients [num_unique, D] of the slice's unique ids
        go to the ids' owners; returns the gradients of ``recv_codes`` [n_recv, D] (an id
        looked up by several ranks appears once per rank: the optimizer sums them)."""
        ordered = grads[torch.from_numpy(self.order)].contiguous()
        out = torch.empty((len(self.recv_codes), grads.shape[1]), dtype=grads.dtype)
        dist.all_to_all_single(out, ordered, self.recv_counts.tolist(), self.send_counts.tolist())
        return out
