"""The cluster config's ``[[models]]`` sections: each served DLRM, its dynamic tables'
admission and eviction.

Apart from ``ekko.node.config`` (the topology) because a model's fields are read by the
trainer and the serving side only, and its checks are about the model's shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, PositiveInt, model_validator

from ekko.node.config_sections import Strict
from ekko.store._validate import DEFAULT_MAX_ABS
from ekko.store.holding import row_bytes
from ekko.store.store import default_reserve

if TYPE_CHECKING:
    from ekko.node.config import ClusterConfig

MB = 1 << 20


class AdmissionSection(Strict):
    """``models[].admission``: which new ids of a dynamic table get a row
    (``ekko.train.admission.AdmissionConfig``)."""

    kind: Literal["all", "count", "probability"] = "all"
    threshold: int = Field(2, ge=1, le=1 << 62)
    sketch_width: int = Field(1 << 16, ge=1, le=1 << 26)
    sketch_depth: int = Field(4, ge=1, le=16)
    probability: float = Field(0.5, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=1 << 64)  # the sketch's salts and the coin are uint64
    idle_rows: bool = False  # the turned away may take free rows and idle ones


class EvictionSection(Strict):
    """``models[].eviction``: which rows of a dynamic table leave
    (``ekko.train.eviction.EvictionConfig``); ``ttl_s`` in seconds since the last update."""

    kind: Literal["none", "lru", "lfu", "rate", "ttl"] = "lru"
    ttl_s: float | None = Field(None, gt=0, lt=1e18)  # EvictionConfig's bound
    lfu_aging: float = Field(10.0, gt=0, le=1e6)  # x row_budget sightings between halvings
    rate_prior_steps: float = Field(40.0, gt=1e-10, le=1e9, strict=True)  # training steps
    rate_patience: float = Field(3.0, gt=1e-10, le=1e6, strict=True)  # its own gaps of silence

    @model_validator(mode="after")
    def _check_ttl(self) -> EvictionSection:
        if self.kind == "ttl" and self.ttl_s is None:
            raise ValueError('ttl_s is required with kind = "ttl"')
        return self


class ModelConfig(Strict):
    """A served DLRM: its tables are ``emb_{i}`` and ``dense/{tensor}`` in the store, after
    ``table_namespace`` — unset: none for a cluster's only model, ``{name}/`` for each of
    several (so two models never write the same tables).

    ``row_budget`` makes every embedding table dynamic (``ekko.train.DynamicEmbedding``):
    keyed by raw ids, at most ``row_budget`` rows each, with ``admission`` and ``eviction``
    (which need it); unset, ids are hashed into ``rows_per_table`` rows.

    ``memory_budget_mb`` (needs ``row_budget``) is what the rows of all those tables may
    take together, as the node's store counts them (``ekko.train.memory_budget``): past it
    the least valuable rows of any table are evicted (deletes, like every eviction), so a
    busy table takes memory from a quiet one; ``row_budget`` still caps each. A node holding
    the model's tables with a ``max_memory_mb`` must fit the budget and what else the store
    counts for the model (``check_memory``)."""

    name: str = "ctr"
    num_dense: int = Field(13, gt=0)
    num_sparse: int = Field(26, gt=0)
    embedding_dim: int = Field(16, gt=0)
    rows_per_table: int = Field(100_000, gt=0)
    bottom_mlp: tuple[PositiveInt, ...] | None = None  # default (64, embedding_dim)
    top_mlp: tuple[PositiveInt, ...] = (64, 32, 1)
    baseline_share: float = Field(0.005, ge=0, lt=1)
    baseline_lag_s: float = Field(120.0, ge=0)
    optimizer: Literal["adam", "adagrad"] = "adam"
    sparse_lr: float = Field(0.01, gt=0)
    dense_lr: float = Field(0.001, gt=0)
    embedding_shards: int = Field(16, gt=0, le=4096)
    dense_interval_s: float = Field(1.0, ge=0)
    table_namespace: str | None = Field(None, pattern=r"^([^/]+/)*$")
    dense_limit: float = Field(64.0, gt=0, lt=1e30)  # |dense feature| accepted (DLRMConfig)
    # |value| a write to any of the model's tables (embedding rows, dense tensors) may hold.
    max_abs: float = Field(DEFAULT_MAX_ABS, gt=0, lt=1e30)
    row_budget: int | None = Field(None, gt=0, le=1 << 31)
    admission: AdmissionSection | None = None
    eviction: EvictionSection | None = None
    # strict: a string or a boolean is refused, not read as a number of MB
    memory_budget_mb: float | None = Field(None, gt=0, lt=1e12, strict=True)

    @property
    def memory_budget_bytes(self) -> int | None:
        mb = self.memory_budget_mb
        return None if mb is None else int(mb * MB)

    def dlrm(self):  # -> ekko.train.dlrm.DLRMConfig; imported lazily (torch is heavy)
        from ekko.train.dlrm import DLRMConfig

        return DLRMConfig(
            dynamic=self._dynamic(),
            num_dense=self.num_dense,
            num_sparse=self.num_sparse,
            embedding_dim=self.embedding_dim,
            rows_per_table=self.rows_per_table,
            bottom_mlp=self.bottom_mlp or (64, self.embedding_dim),
            top_mlp=self.top_mlp,
            table_namespace=self.table_namespace or "",
            dense_limit=self.dense_limit,
            memory_budget_bytes=self.memory_budget_bytes,
        )

    def _dynamic(self):  # -> ekko.train.DynamicEmbeddingConfig | None
        if self.row_budget is None:
            return None
        from ekko.train.admission import AdmissionConfig
        from ekko.train.dynamic_embedding import DynamicEmbeddingConfig
        from ekko.train.eviction import EvictionConfig

        return DynamicEmbeddingConfig(
            row_budget=self.row_budget,
            admission=AdmissionConfig(**(self.admission or AdmissionSection()).model_dump()),
            eviction=EvictionConfig(**(self.eviction or EvictionSection()).model_dump()),
        )

    def served(self):  # -> ekko.serve.ServedModel; imported lazily (torch is heavy)
        """What a serving node needs of this model."""
        from ekko.serve import ServedModel

        return ServedModel(self.name, self.dlrm(), self.baseline_share, self.model_dump())

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.bottom_mlp is not None and (
            not self.bottom_mlp or self.bottom_mlp[-1] != self.embedding_dim
        ):
            raise ValueError(
                f"models[{self.name}].bottom_mlp must end with embedding_dim="
                f"{self.embedding_dim}, got {list(self.bottom_mlp)}"
            )
        if not self.top_mlp or self.top_mlp[-1] != 1:
            raise ValueError(f"models[{self.name}].top_mlp must end with 1 (one logit)")
        for field in ("admission", "eviction", "memory_budget_mb"):
            if getattr(self, field) is not None and self.row_budget is None:
                raise ValueError(
                    f"models[{self.name}].{field} needs models[{self.name}].row_budget "
                    f"(the rows each dynamic table may hold)"
                )
        budget = self.memory_budget_bytes
        one_each = self.num_sparse * row_bytes(self.embedding_dim)
        if budget is not None and budget < one_each:
            raise ValueError(
                f"models[{self.name}].memory_budget_mb = {self.memory_budget_mb} ({budget} B) "
                f"holds less than a row of each of its {self.num_sparse} tables "
                f"({self.num_sparse} x {row_bytes(self.embedding_dim)} B = {one_each} B)"
            )
        return self

    def dense_dims(self) -> list[int]:
        """Widths of the model's dense tables (each MLP layer's weight and bias)."""
        dims = []
        n = self.num_sparse + 1
        for width, sizes in (
            (self.num_dense, self.bottom_mlp or (64, self.embedding_dim)),
            (self.embedding_dim + n * (n - 1) // 2, self.top_mlp),
        ):
            for out in sizes:
                dims += [width * out, out]
                width = out
        return dims

    def store_bytes(self) -> int:
        """The most a node's store counts for this model under its memory budget: the
        budget, plus what the store reserves for each of its tables at creation (it counts
        a table's first rows, ``Store.create_table``'s default, before they are written)."""
        assert self.memory_budget_bytes is not None
        dims = [self.embedding_dim] * self.num_sparse + self.dense_dims()
        return self.memory_budget_bytes + sum(default_reserve(d) * row_bytes(d) for d in dims)


def check_memory(config: ClusterConfig) -> None:
    """Raise ValueError when a node holding every partition (so every table of the models)
    has a ``max_memory_mb`` smaller than what its store may count for the models with a
    memory budget and the ``[[tables]]``: the store would refuse the trainer's rows."""
    budgeted = [m for m in config.models if m.memory_budget_mb is not None]
    if not budgeted:
        return
    models = sum(m.store_bytes() for m in budgeted)
    tables = sum(t.initial_rows * row_bytes(t.dim) for t in config.tables)
    for n in config.nodes:
        if n.max_memory_mb is None or len(config.held(n.name)) < config.cluster.partitions:
            continue
        if models + tables > n.max_memory_mb * MB:
            budgets = ", ".join(f"models[{m.name}].memory_budget_mb = {m.memory_budget_mb}"
                                for m in budgeted)  # fmt: skip
            reserved = models - sum(m.memory_budget_bytes or 0 for m in budgeted)
            raise ValueError(
                f"nodes[{n.name}].max_memory_mb = {n.max_memory_mb} cannot hold {budgets}: "
                f"with the store's reservations for the models' tables "
                f"({reserved / MB:.2f} MB: dense tensors and each table's first rows) and "
                f"[[tables]] ({tables / MB:.2f} MB) the store may count "
                f"{(models + tables) / MB:.2f} MB; raise max_memory_mb or lower the budget"
            )
