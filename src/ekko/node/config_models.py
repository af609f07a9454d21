"""The cluster config's ``[[models]]`` sections: each served DLRM, its dynamic tables'
admission and eviction.

Apart from ``ekko.node.config`` (the topology) because a model's fields are read by the
trainer and the serving side only, and its checks are about the model's shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from ekko.node.config_sections import Strict
from ekko.store._validate import DEFAULT_MAX_ABS


class AdmissionSection(Strict):
    """``models[].admission``: which new ids of a dynamic table get a row
    (``ekko.train.admission.AdmissionConfig``)."""

    kind: Literal["all", "count", "probability"] = "all"
    threshold: int = Field(2, ge=1)
    sketch_width: int = Field(1 << 16, ge=1, le=1 << 26)
    sketch_depth: int = Field(4, ge=1, le=16)
    probability: float = Field(0.5, gt=0, le=1)
    seed: int = Field(0, ge=0, lt=1 << 64)  # the sketch's salts and the coin are uint64
    idle_rows: bool = False  # the turned away may take free rows and idle ones


class EvictionSection(Strict):
    """``models[].eviction``: which rows of a dynamic table leave
    (``ekko.train.eviction.EvictionConfig``); ``ttl_s`` in seconds since the last update."""

    kind: Literal["none", "lru", "lfu", "ttl"] = "lru"
    ttl_s: float | None = Field(None, gt=0, lt=1e18)  # EvictionConfig's bound

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
    (which need it); unset, ids are hashed into ``rows_per_table`` rows."""

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
        for field in ("admission", "eviction"):
            if getattr(self, field) is not None and self.row_budget is None:
                raise ValueError(
                    f"models[{self.name}].{field} needs models[{self.name}].row_budget "
                    f"(the rows each dynamic table may hold)"
                )
        return self
