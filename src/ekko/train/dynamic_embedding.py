"""An embedding table keyed by raw feature ids, with admission, eviction and a row budget.

A fixed ``nn.Embedding`` indexed by ``id % rows`` makes unrelated ids share rows and never
returns memory; production systems give each id its own row, admit only ids that come back
and evict rows that stopped being useful (TorchRec's managed collisions, TFRA's restrict
policies, HugeCTR's admission). Here the rows are one preallocated ``nn.Embedding`` of
``row_budget + 1`` rows: the last is the shared default row every id without a row reads.
The store is keyed by the raw ids (``EmbeddingPublisher`` maps slots back), so replicas and
serving look ids up directly and read zeros for ids the store does not hold.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from ekko.train.admission import AdmissionConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.memory_budget import MemoryBudget, row_bytes
from ekko.train.slots import Slots, SlotStatistics

DEFAULT_ROWS = ("zeros", "trained")


@dataclass(frozen=True)
class DynamicEmbeddingConfig:
    """A dynamic table's budget and policies.

    ``row_budget`` rows at most hold ids (the parameter has one more: the default row).
    ``default_row``: ``"zeros"`` (a fixed zero row, what serving reads for an id the store
    does not hold) or ``"trained"`` (one shared row learned from every id without a row of
    its own; it lives only in the trainer and is never published).
    """

    row_budget: int
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    default_row: Literal["zeros", "trained"] = "zeros"

    def __post_init__(self) -> None:
        if not 0 < self.row_budget <= 1 << 31:
            raise ValueError(f"row_budget must be in [1, 2**31]: {self.row_budget}")
        if self.default_row not in DEFAULT_ROWS:
            raise ValueError(f"default_row must be one of {DEFAULT_ROWS}: {self.default_row!r}")


DynamicEmbeddingStatistics = SlotStatistics


class DynamicEmbedding(nn.Module):
    """``nn.Embedding`` semantics over raw int64 ids (any value), within a row budget.

    Why: a table that grows with every id ever seen is the memory leak of online training;
    one that hashes ids into fixed rows mixes unrelated ids. This one maps each admitted id
    to a row of its own, reuses the rows of evicted ids, and reports evictions so the
    publisher deletes them from the store (and so from every replica).

    Training lookups (module in training mode, autograd on) count sightings, admit, evict
    and touch rows; other lookups only read (an unknown id reads the default row). The
    lookups before a backward pass are one step: none evicts a row another one read (the
    table may be called several times a step); the step ends when the backward pass
    reaches a lookup's output. An id
    without a row gets no gradient into any row that holds an id. A reused row starts from a
    fresh initial value and fresh optimizer state: call ``bind_optimizers`` with the
    optimizers of ``embedding.weight`` (``OnlineTrainer`` does).

    Args:
        embedding_dim: D.
        config: budget, admission, eviction, default row.
        init_bound: rows start uniform in [-init_bound, init_bound] (default D**-0.5).
        clock: time for TTL, in the units of ``eviction.ttl_s`` (inject a fake in tests).
        memory: a byte budget shared with other tables (a model's at its node): a lookup
            may then evict rows of any of them, the least valuable first; each row costs
            what the store spends on it (``row_bytes(D)``).
        seed: seeds the fresh values of reused rows (its own generator; unset: drawn from
            torch's global generator at construction, so ``torch.manual_seed`` before it, or
            ``DLRMConfig.seed``, makes a run repeat).

    Call args:
        ids: int64 [...] raw ids.

    Returns:
        float32 [..., D].
    """

    def __init__(
        self,
        embedding_dim: int,
        config: DynamicEmbeddingConfig,
        *,
        init_bound: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        memory: MemoryBudget | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if seed is None:
            seed = int(torch.randint(0, 1 << 62, ()).item())
        self._generator = torch.Generator().manual_seed(seed)
        budget = config.row_budget
        self.default_slot = budget
        padding = budget if config.default_row == "zeros" else None
        self.embedding = nn.Embedding(budget + 1, embedding_dim, sparse=True, padding_idx=padding)
        self.init_bound = embedding_dim**-0.5 if init_bound is None else init_bound
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -self.init_bound, self.init_bound)
            if padding is not None:
                self.embedding.weight[padding].zero_()
        self._clock = clock
        self.slots = Slots(
            budget,
            config.admission,
            config.eviction,
            memory=memory,
            row_bytes=row_bytes(embedding_dim),
        )
        self._optimizers: list[torch.optim.Optimizer] = []
        self._evicted: list[np.ndarray] | None = None

    @property
    def row_budget(self) -> int:
        return self.config.row_budget

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    def bind_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """The optimizers whose per-row state of ``embedding.weight`` a reused row resets."""
        self._optimizers = list(optimizers)

    def track_evictions(self) -> None:
        """Keep evicted ids for ``take_evicted`` (the publisher turns them into deletes);
        without a taker they are not kept."""
        if self._evicted is None:
            self._evicted = []

    def take_evicted(self) -> np.ndarray:
        """Ids evicted since the last call, int64 [n] (an id may appear twice), those
        another table's lookups evicted under a shared memory budget included."""
        self._take_freed()
        if not self._evicted:
            return np.empty(0, dtype=np.int64)
        out = np.concatenate(self._evicted)
        self._evicted = []
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.detach().reshape(-1).cpu().numpy().astype(np.int64, copy=False)
        training = self.training and torch.is_grad_enabled()
        if training:
            slots, gone, freed = self.slots.assign(flat, self._clock())
            self._freed(gone, freed)
        else:
            slots = self.slots.read(flat)
        out = self.embedding(torch.from_numpy(slots).reshape(ids.shape).to(ids.device))
        if training and out.requires_grad:
            # the step's lookups share their rows until its backward pass reaches them (a
            # hook on this output, not on the weight: a copied module keeps no weight hooks)
            out.register_hook(self._step_ended)
        return out

    def _step_ended(self, grad: torch.Tensor) -> None:
        self.slots.end_step()

    def _take_freed(self) -> None:
        self._freed(*self.slots.take_freed())

    def _freed(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Rows ``slots`` lost their ids ``ids``: fresh rows, and the ids kept as evicted."""
        if slots.size:
            self._reset_rows(slots)
            if self._evicted is not None:
                self._evicted.append(ids)

    def keys_of(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of the ``slots`` that hold an id now; the default row and freed
        rows are left out."""
        return self.slots.keys_of(slots)

    def live(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, slots) of every row holding an id."""
        return self.slots.live()

    def forget(self, ids: np.ndarray) -> int:
        """Give up the rows of ``ids`` the store no longer holds (a rollback deleted them):
        fresh rows, free for the next ids, no delete to publish. Returns how many were held."""
        slots = self.slots.drop(ids)
        if slots.size:
            self._reset_rows(slots)
        return int(slots.size)

    @torch.no_grad()
    def load(self, ids: np.ndarray, values: np.ndarray) -> int:
        """Set rows of ``ids`` (unique) to ``values`` [n, D], giving ids a row past
        admission (they were admitted before: a resume from the store). Ids beyond the free
        rows are skipped (returns how many) and, when evictions are tracked, handed to
        ``take_evicted`` like evicted ones, so a store holding more than the budget (a
        budget lowered since) is brought within it."""
        ids = np.asarray(ids, dtype=np.int64)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (ids.size, self.embedding_dim):
            raise ValueError(
                f"rows of shape {values.shape} for {ids.size} ids; the table's rows have "
                f"width {self.embedding_dim}"
            )
        slots = self.slots.load(ids, self._clock())
        keep = slots >= 0
        weight = self.embedding.weight
        idx = torch.from_numpy(slots[keep])
        weight.index_copy_(0, idx, torch.from_numpy(values[keep]).to(weight.dtype))
        if self._evicted is not None and not keep.all():
            self._evicted.append(ids[~keep])
        return int((~keep).sum())

    @torch.no_grad()
    def _reset_rows(self, slots: np.ndarray) -> None:
        """A fresh initial value and fresh optimizer state (Adagrad's sum, Adam's moments)
        for the rows ``slots``: the next id to hold one starts as if new."""
        weight = self.embedding.weight
        idx = torch.from_numpy(np.ascontiguousarray(slots))
        fresh = torch.empty(len(slots), weight.shape[1], dtype=weight.dtype)
        fresh.uniform_(-self.init_bound, self.init_bound, generator=self._generator)
        weight.index_copy_(0, idx, fresh)
        for opt in self._optimizers:
            state = opt.state.get(weight)
            if not state:
                continue
            start = next(
                (g.get("initial_accumulator_value", 0.0) for g in opt.param_groups
                 if any(p is weight for p in g["params"])),
                0.0,
            )  # fmt: skip
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == weight.shape:
                    value.index_fill_(0, idx, start if key == "sum" else 0.0)

    def statistics(self) -> DynamicEmbeddingStatistics:
        """Counters since construction."""
        return self.slots.statistics()
