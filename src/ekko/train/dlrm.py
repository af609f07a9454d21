"""DLRM for online training, and the same forward pass for serving replicas.

Layout follows TorchRec ``torchrec/models/dlrm.py``: ``SparseArch`` (embedding bags),
``DenseArch`` (bottom MLP), ``InteractionArch`` (pairwise dots), ``OverArch`` (top MLP).

Notation in shapes: B = batch size, F = number of sparse features, D = embedding dim,
N = number of dense features.

Table names are the contract with the store: the i-th sparse feature lives in table
``emb_{i}``, every dense tensor in ``dense/{state_dict key}`` (one key, 0, whose row is the
flattened tensor), e.g. ``dense/bottom.0.weight``. Ids are hashed into a table by
``id % rows_per_table`` before the lookup, on both the training and the serving side; with
``DLRMConfig.dynamic`` set, each table is a ``DynamicEmbedding`` instead and both sides look
raw ids up (the store is keyed by them, an id it does not hold reads zeros).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ekko.train.dynamic_embedding import DynamicEmbedding, DynamicEmbeddingConfig
from ekko.train.memory_budget import MAX_BUDGET_BYTES, MemoryBudget, row_bytes

Lookup = Callable[[str, np.ndarray], np.ndarray]
"""``lookup(table, ids int64 [n]) -> float32 [n, dim]``: rows of one table from a store."""

DENSE_PREFIX = "dense/"


def embedding_table_name(feature: int, namespace: str = "") -> str:
    """Store table holding the rows of sparse feature ``feature`` (``DLRMConfig.table_namespace``
    first, when the store holds several models)."""
    return f"{namespace}emb_{feature}"


def dense_table_name(state_key: str, namespace: str = "") -> str:
    """Store table holding the dense tensor ``state_key`` of the model's state dict."""
    return f"{namespace}{DENSE_PREFIX}{state_key}"


@dataclass(frozen=True)
class DLRMConfig:
    """Shape of a DLRM; validated in one place so a bad field is named early.

    ``bottom_mlp[-1]`` must equal ``embedding_dim``: the bottom MLP's output joins the
    embeddings in the pairwise interaction. ``top_mlp[-1]`` must be 1 (one logit).
    ``table_namespace`` starts every store table name of the model (``""``, or ending in
    ``/``), so models sharing a store keep apart.

    ``dense_limit`` bounds every dense feature a request may carry: ``|x| <= dense_limit``.
    Dense features are log-transformed counts (``log1p`` of a count in the synthetic and
    Criteo-shaped streams, ``log1p`` counts and a rate in [0, 1] for MovieLens), and
    ``log1p(2**63)`` is 43.7, so 64 holds any of them with room for other monotone scalings;
    a value far outside (e.g. 3e38, still a finite float32) overflows the bottom MLP.

    ``dynamic`` (None: hashed tables of ``rows_per_table`` rows) makes every sparse table a
    ``DynamicEmbedding`` keyed by raw ids, with its row budget, admission and eviction.
    ``memory_budget_bytes`` (needs ``dynamic``; None: none) is what the rows of all of them
    may take together, as the store counts them (``ekko.train.memory_budget``); it must
    hold a row of each table.
    """

    num_dense: int = 13
    num_sparse: int = 26
    embedding_dim: int = 16
    rows_per_table: int = 100_000
    bottom_mlp: tuple[int, ...] = (64, 16)
    top_mlp: tuple[int, ...] = (64, 32, 1)
    seed: int = 0
    table_namespace: str = ""
    dense_limit: float = 64.0
    dynamic: DynamicEmbeddingConfig | None = None
    memory_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.table_namespace and not self.table_namespace.endswith("/"):
            raise ValueError(
                f"DLRMConfig.table_namespace must be empty or end with '/', "
                f"got {self.table_namespace!r}"
            )
        if not 0 < self.dense_limit < 1e30:
            raise ValueError(
                f"DLRMConfig.dense_limit must be a positive finite bound (< 1e30), "
                f"got {self.dense_limit}"
            )
        for field in ("num_dense", "num_sparse", "embedding_dim", "rows_per_table"):
            if getattr(self, field) <= 0:
                raise ValueError(f"DLRMConfig.{field} must be > 0, got {getattr(self, field)}")
        if not self.bottom_mlp or self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"DLRMConfig.bottom_mlp must end with embedding_dim={self.embedding_dim}, "
                f"got {self.bottom_mlp}"
            )
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ValueError(f"DLRMConfig.top_mlp must end with 1, got {self.top_mlp}")
        if self.dynamic is not None and self.dynamic.default_row != "zeros":
            raise ValueError(
                "DLRMConfig.dynamic.default_row must be 'zeros': a serving replica reads zeros "
                "for an id the store does not hold, and a trained default row is not published"
            )
        if self.memory_budget_bytes is not None:
            if self.dynamic is None:
                raise ValueError(
                    "DLRMConfig.memory_budget_bytes needs dynamic tables (DLRMConfig.dynamic): "
                    "a hashed table holds all its rows"
                )
            least = self.num_sparse * row_bytes(self.embedding_dim)
            if not least <= self.memory_budget_bytes <= MAX_BUDGET_BYTES:
                raise ValueError(
                    f"DLRMConfig.memory_budget_bytes must hold a row of each of the "
                    f"{self.num_sparse} tables ({least} B) and be at most 2**60: "
                    f"{self.memory_budget_bytes}"
                )

    @property
    def interaction_dim(self) -> int:
        """Width of the top MLP input: D + (F+1)F/2 pairwise dots."""
        n = self.num_sparse + 1
        return self.embedding_dim + n * (n - 1) // 2


def _mlp(in_features: int, sizes: tuple[int, ...], last_relu: bool) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, out in enumerate(sizes):
        layers.append(nn.Linear(in_features, out))
        if last_relu or i < len(sizes) - 1:
            layers.append(nn.ReLU())
        in_features = out
    return layers


class SparseArch(nn.Module):
    """One sum-pooled embedding bag per sparse feature, with sparse gradients.

    Why separate tables: each feature is its own store table (``emb_{i}``), so the publisher
    and the store see per-feature rows, and a sparse optimizer touches only looked-up rows.
    With ``config.dynamic`` each table is a ``DynamicEmbedding`` (one id per bag, so the
    sum-pooled bag and a plain lookup are the same), sharing ``memory`` (a
    ``MemoryBudget``) when ``config.memory_budget_bytes`` is set.

    Args:
        config: model shape.

    Call args:
        sparse: int64 [B, F], one id per feature, already hashed into [0, rows_per_table)
            (raw ids with ``config.dynamic``).

    Returns:
        float32 [B, F, D].
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        bound = config.rows_per_table**-0.5
        self.embedding_bags = nn.ModuleDict()
        self.memory: MemoryBudget | None = None
        if config.memory_budget_bytes is not None and config.dynamic is not None:
            self.memory = MemoryBudget(config.memory_budget_bytes, config.dynamic.eviction)
        for i in range(config.num_sparse):
            table: nn.Module
            if config.dynamic is not None:
                table = DynamicEmbedding(
                    config.embedding_dim, config.dynamic, init_bound=bound, memory=self.memory
                )
            else:
                table = nn.EmbeddingBag(
                    config.rows_per_table, config.embedding_dim, mode="sum", sparse=True
                )
                nn.init.uniform_(table.weight, -bound, bound)
            self.embedding_bags[embedding_table_name(i)] = table

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        cols = sparse.unbind(1)
        pooled = [
            table(col) if isinstance(table, DynamicEmbedding) else table(col.unsqueeze(1))
            for table, col in zip(self.embedding_bags.values(), cols, strict=True)
        ]
        return torch.stack(pooled, dim=1)

    def dynamic_tables(self) -> dict[str, DynamicEmbedding]:
        """The dynamic tables by their unprefixed table name (none for hashed tables)."""
        return {
            name: t for name, t in self.embedding_bags.items() if isinstance(t, DynamicEmbedding)
        }


class DenseArch(nn.Sequential):
    """Bottom MLP: projects the dense features into the embedding space.

    Why: the dense vector takes part in the pairwise interaction like one more embedding.

    Call args:
        dense: float32 [B, N].

    Returns:
        float32 [B, D].
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__(*_mlp(config.num_dense, config.bottom_mlp, last_relu=True))


class InteractionArch(nn.Module):
    """Pairwise dot products of the dense projection and all embeddings (upper triangle).

    Why: DLRM's second-order feature crosses at a cost linear in the batch.

    Call args:
        dense: float32 [B, D]; sparse: float32 [B, F, D].

    Returns:
        float32 [B, D + (F+1)F/2]: the dense projection followed by the dots.
    """

    def __init__(self, num_sparse: int) -> None:
        super().__init__()
        n = num_sparse + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        combined = torch.cat([dense.unsqueeze(1), sparse], dim=1)  # [B, F+1, D]
        dots = torch.bmm(combined, combined.transpose(1, 2))  # [B, F+1, F+1]
        return torch.cat([dense, dots[:, self.rows, self.cols]], dim=1)


class OverArch(nn.Sequential):
    """Top MLP: interaction features to one logit per event.

    Call args:
        features: float32 [B, D + (F+1)F/2].

    Returns:
        float32 [B, 1].
    """

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__(*_mlp(config.interaction_dim, config.top_mlp, last_relu=False))


class _DLRMHead(nn.Module):
    """Everything of a DLRM but the embedding tables: shared by training and serving so both
    run the identical forward pass."""

    def __init__(self, config: DLRMConfig) -> None:
        super().__init__()
        self.config = config
        self.bottom = DenseArch(config)
        self.interaction = InteractionArch(config.num_sparse)
        self.top = OverArch(config)

    def logits(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """dense float32 [B, N], embedded float32 [B, F, D] -> logits float32 [B]."""
        return self.top(self.interaction(self.bottom(dense), embedded)).squeeze(1)


class DLRM(_DLRMHead):
    """The trained model: embedding tables plus the dense arches.

    Why its own class: it owns the ``nn.EmbeddingBag`` tables; the serving replica
    (``DLRMServingModel``) runs the same head over rows looked up from a store.

    Call args:
        dense: float32 [B, N]; sparse: int64 [B, F] raw ids (hashed modulo rows_per_table,
        unless the tables are dynamic).

    Returns:
        logits float32 [B] (apply a sigmoid for CTR).
    """

    def __init__(self, config: DLRMConfig) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            super().__init__(config)
            self.sparse = SparseArch(config)

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        if self.config.dynamic is None:
            sparse = sparse % self.config.rows_per_table
        return self.logits(dense, self.sparse(sparse))

    def table_names(self) -> dict[str, str]:
        """Qualified module name -> store table name, for ``PublisherConfig.table_names``."""
        ns = self.config.table_namespace
        return {f"sparse.embedding_bags.{name}": ns + name for name in self.sparse.embedding_bags}

    def dense_state(self) -> dict[str, torch.Tensor]:
        """The dense tensors (MLP weights and biases) by state-dict key."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("sparse.")}


class DLRMServingModel(_DLRMHead):
    """A DLRM replica that never holds embedding tables: rows come from ``lookup``.

    Why: an inference replica keeps its tables in the store; materialising a full
    ``nn.EmbeddingBag`` per table would double memory and lag behind the store. The head is
    the same code as ``DLRM``'s, so predictions match the trainer's given the same rows.

    Args:
        config: the trained model's shape.
        lookup: ``lookup(table, ids) -> float32 [n, D]`` rows from the store.
        dense_state: dense tensors by state-dict key; None reads them through ``lookup``
            from the ``dense/...`` tables (key 0, flattened).
    """

    def __init__(
        self,
        config: DLRMConfig,
        lookup: Lookup,
        dense_state: Mapping[str, torch.Tensor | np.ndarray] | None = None,
    ) -> None:
        super().__init__(config)
        self.lookup = lookup
        self.eval()
        self.load_dense(dense_state)

    def load_dense(self, state: Mapping[str, torch.Tensor | np.ndarray] | None = None) -> None:
        """Replace the dense weights; None re-reads them from the store through ``lookup``."""
        own = self.state_dict()
        if state is None:
            state = {
                key: self.lookup(
                    dense_table_name(key, self.config.table_namespace), np.zeros(1, dtype=np.int64)
                )
                for key in own
            }
        loaded = {
            key: torch.as_tensor(np.asarray(state[key], dtype=np.float32)).reshape(t.shape)
            for key, t in own.items()
        }
        self.load_state_dict(loaded, strict=True)

    @torch.no_grad()
    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """dense float32 [B, N], sparse int64 [B, F] raw ids -> CTR float32 [B]. With dynamic
        tables an id the store does not hold reads zeros, as the trainer's default row."""
        cfg = self.config
        ids = np.asarray(sparse, dtype=np.int64)
        if cfg.dynamic is None:
            ids = ids % cfg.rows_per_table
        rows = [
            np.asarray(
                self.lookup(embedding_table_name(i, cfg.table_namespace), ids[:, i]),
                dtype=np.float32,
            )
            for i in range(cfg.num_sparse)
        ]
        embedded = torch.from_numpy(np.stack(rows, axis=1))  # [B, F, D]
        logits = self.logits(torch.as_tensor(dense, dtype=torch.float32), embedded)
        return torch.sigmoid(logits).numpy()
