"""One servable copy of a DLRM over one store: current embedding rows, cached dense weights.

Embedding rows are read from the store on every request (the replica's current rows, so an
update is served the moment it is applied). Dense weights (a few MLP tensors, ``dense/...``
tables) are cached in the torch module and reloaded only when one of their tables' shard
versions moved; the check is a handful of integer sums per request.
"""

from __future__ import annotations

import logging

import numpy as np

from ekko.serve.errors import ModelNotReady, NonFiniteRows
from ekko.store import Store, Table
from ekko.train.dlrm import (
    DenseArch,
    DLRMConfig,
    DLRMServingModel,
    OverArch,
    dense_table_name,
    embedding_table_name,
)

_KEY0 = np.zeros(1, dtype=np.int64)
log = logging.getLogger(__name__)


def _finite(values: np.ndarray) -> bool:
    # A float64 sum is non-finite exactly when an element is: one pass, no temporary mask.
    return bool(np.isfinite(values.sum(dtype=np.float64)))


def refusal(label: str, reported: set[str], table: str, what: str) -> NonFiniteRows:
    """The 503 for ``what`` (the bad values, naming ``table``); logged once per table (the
    tables already logged are in ``reported``)."""
    message = (
        f"model {label}: {what}; predictions that read it are refused until a finite "
        f"version arrives"
    )
    if table not in reported:
        reported.add(table)
        log.warning("%s", message)
    return NonFiniteRows(message)


def dense_shapes(config: DLRMConfig) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape of every dense tensor of a DLRM (bottom and top MLPs).

    Computed from the arches alone, so no embedding tables are ever allocated; the keys are
    the ``DLRMServingModel`` state-dict keys (``bottom.0.weight`` ...), checked on first load.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, arch in (("bottom", DenseArch(config)), ("top", OverArch(config))):
        for key, t in arch.state_dict().items():
            shapes[f"{prefix}.{key}"] = tuple(t.shape)
    return shapes


class ReplicaModel:
    """A ``DLRMServingModel`` fed from one store, with the dense weights cached.

    Why: the forward pass must see the replica's current rows (that is the point of Ekko),
    but re-reading and re-loading every MLP tensor per request would cost more than the
    forward pass. Embedding tables missing from the store (not synced yet) read as zero rows,
    the same default row the store gives an unseen key; missing dense tables raise
    ``ModelNotReady``.

    Not thread-safe, like ``Table``: call it from the thread that applies rows (the node's
    event loop).

    Args:
        store: the store to read (the live replica store, or a lagged one for a baseline).
        config: the served model's shape.
        label: model/variant name, for error messages.
    """

    def __init__(self, store: Store, config: DLRMConfig, label: str) -> None:
        self.store = store
        self.config = config
        self.label = label
        self.shapes = dense_shapes(config)
        self._dense_names = [dense_table_name(k, config.table_namespace) for k in self.shapes]
        self._catalog = -1
        self._emb: list[Table | None] = []
        self._dense: list[Table] | None = None
        self._dense_stamp = -1
        self._model: DLRMServingModel | None = None
        self.dense_loads = 0
        self._reported: set[str] = set()  # tables whose non-finite rows were logged once

    def _refuse(self, table: str, what: str) -> NonFiniteRows:
        return refusal(self.label, self._reported, table, what)

    # -- table handles -----------------------------------------------------------------------

    def _refresh_tables(self) -> None:
        """Re-resolve table handles when the store's catalog changed (a table arrived)."""
        if self.store.catalog_version == self._catalog:
            return
        tables = self.store.tables
        cfg = self.config
        emb: list[Table | None] = []
        for i in range(cfg.num_sparse):
            t = tables.get(embedding_table_name(i, cfg.table_namespace))
            if t is not None and t.dim != cfg.embedding_dim:
                raise ModelNotReady(
                    f"model {self.label}: table {t.name!r} has dim {t.dim}, the model expects "
                    f"embedding_dim={cfg.embedding_dim}"
                )
            emb.append(t)
        dense: list[Table] = []
        for name, shape in zip(self._dense_names, self.shapes.values(), strict=True):
            t = tables.get(name)
            if t is None:
                raise ModelNotReady(
                    f"model {self.label}: dense table {name!r} is not in this replica's store "
                    f"yet (still syncing, or the model was never published)"
                )
            numel = int(np.prod(shape))
            if t.dim != numel:
                raise ModelNotReady(
                    f"model {self.label}: dense table {name!r} has dim {t.dim}, the model "
                    f"expects {numel} (shape {shape})"
                )
            dense.append(t)
        self._emb = emb
        self._dense = dense
        self._catalog = self.store.catalog_version

    def _stamp(self) -> int:
        """Sum of the dense tables' shard versions; they only grow, so any change moves it."""
        assert self._dense is not None
        return sum(int(t.shard_version.sum()) for t in self._dense)

    # -- loading -----------------------------------------------------------------------------

    def _read_dense(self) -> dict[str, np.ndarray]:
        assert self._dense is not None
        state: dict[str, np.ndarray] = {}
        for key, t in zip(self.shapes, self._dense, strict=True):
            values, _versions, found = t.lookup(_KEY0)
            if not found[0]:
                raise ModelNotReady(
                    f"model {self.label}: dense table {t.name!r} has no row yet (still syncing)"
                )
            if not _finite(values[0]):
                raise self._refuse(t.name, f"NaN or infinite dense weights in table {t.name!r}")
            state[key] = values[0]
        return state

    def _lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        """``Lookup`` for the serving model: current rows, zeros where missing."""
        feature = int(table.rsplit("_", 1)[1])
        t = self._emb[feature]
        if t is None:
            return np.zeros((len(ids), self.config.embedding_dim), dtype=np.float32)
        keys = np.ascontiguousarray(ids, dtype=np.int64)
        rows = t.lookup(keys)[0]
        if not _finite(rows):
            bad = int(keys[np.flatnonzero(~np.isfinite(rows).all(axis=1))[0]])
            raise self._refuse(t.name, f"NaN or infinite row of key {bad} in table {t.name!r}")
        return rows

    def ensure_ready(self) -> DLRMServingModel:
        """The serving model with dense weights as of the store's current rows."""
        self._refresh_tables()
        stamp = self._stamp()
        if self._model is not None and stamp == self._dense_stamp:
            return self._model
        state = self._read_dense()
        if self._model is None:
            self._model = DLRMServingModel(self.config, self._lookup, dense_state=state)
        else:
            self._model.load_dense(state)
        self._dense_stamp = stamp
        self.dense_loads += 1
        return self._model

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """dense float32 [B, N], sparse int64 [B, F] raw ids -> CTR float32 [B], every one
        finite: ``NonFiniteRows`` (503) instead when a row read is not, or the forward pass
        overflowed on finite but huge weights."""
        ctr = self.ensure_ready().predict(dense, sparse)
        if not _finite(ctr):
            prefix = dense_table_name("", self.config.table_namespace)
            raise self._refuse(
                prefix,
                f"the forward pass overflowed: finite but huge weights in the {prefix!r} tables",
            )
        return ctr
