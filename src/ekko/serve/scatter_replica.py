"""A servable DLRM whose rows come from the partition holders (``PartitionedLookup``).

The counterpart of ``ReplicaModel`` for a serving node that does not hold the model: one
predict batch asks, in one scatter, for each embedding table's distinct ids and for every
dense table's row (key 0) — the dense ones with the version already loaded, so an unchanged
dense tensor costs its version, not its values. Then the same ``DLRMServingModel`` forward as
the local replica runs on the rows gathered: the same rows give the same bits.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from ekko.serve.errors import ModelNotReady, NonFiniteRows
from ekko.serve.replica import _finite, dense_shapes, refusal
from ekko.serve.scatter import PartitionedLookup
from ekko.train.dlrm import DLRMConfig, DLRMServingModel, dense_table_name, embedding_table_name

_KEY0 = np.zeros(1, dtype=np.int64)
log = logging.getLogger(__name__)


@njit(cache=True, nogil=True)
def unique_columns(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each column's distinct ids of ``ids`` (int64 [B, F]), ascending, column after column
    (int64 [n]); where column ``j``'s start and end (int64 [F + 1]); and for each id its
    place among its column's (int64 [B, F]): ``np.unique(ids[:, j], return_inverse=True)``
    of every column in one call (26 calls of it cost a serving node ~0.2 ms a predict)."""
    b, f = ids.shape
    keys = np.empty(b * f, np.int64)
    bounds = np.zeros(f + 1, np.int64)
    inverse = np.empty((b, f), np.int64)
    at = 0
    for j in range(f):
        col = ids[:, j].copy()
        order = np.argsort(col, kind="mergesort")
        last = 0
        for r in range(b):
            v = col[order[r]]
            if r == 0 or v != last:
                keys[at] = v
                at += 1
                last = v
            inverse[order[r], j] = at - 1 - bounds[j]
        bounds[j + 1] = at
    return keys[:at], bounds, inverse


class ScatterReplica:
    """A ``DLRMServingModel`` fed by scatter-gather lookups, its dense weights cached by
    version.

    Why the dense tensors ride every batch's scatter: they are rows of tables too, held by
    some partition; asking for their version with each batch keeps them as fresh as the
    holders' (never older: a dense row is loaded only at a version above the loaded one),
    at the cost of a version per dense table when nothing changed.

    Args:
        rows: the partition holders' lookup.
        config: the served model's shape.
        label: model/variant name, for error messages.
    """

    store = None  # no local store: ``InferenceService.replica_store`` has none to give

    def __init__(self, rows: PartitionedLookup, config: DLRMConfig, label: str) -> None:
        self.rows = rows
        self.config = config
        self.label = label
        self.shapes = dense_shapes(config)
        self._dense_names = [dense_table_name(k, config.table_namespace) for k in self.shapes]
        self._emb_names = [
            embedding_table_name(i, config.table_namespace) for i in range(config.num_sparse)
        ]
        self._state: dict[str, np.ndarray] = {}
        self._versions: dict[str, int] = {}  # dense table -> the version loaded
        self._model: DLRMServingModel | None = None
        self._batch: dict[str, np.ndarray] = {}
        self.dense_loads = 0
        self._reported: set[str] = set()

    def _refuse(self, table: str, what: str) -> NonFiniteRows:
        return refusal(self.label, self._reported, table, what)

    def ensure_ready(self) -> DLRMServingModel:
        """The model as last loaded; ``ModelNotReady`` before a batch fetched its dense
        weights (readiness here is what the last scatter saw, not a lookup of its own)."""
        if self._model is None:
            raise ModelNotReady(
                f"model {self.label}: dense weights not fetched from the partition holders "
                f"yet (the first predict fetches them)"
            )
        return self._model

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        raise TypeError(f"model {self.label} is served by scatter-gather: await apredict")

    def _lookup(self, table: str, ids: np.ndarray) -> np.ndarray:
        rows = self._batch[table]
        if rows.shape[0] != ids.shape[0]:
            raise AssertionError(f"table {table!r}: {rows.shape[0]} rows for {ids.shape[0]} ids")
        return rows

    def _load_dense(self, got: dict) -> None:
        """Take every dense row newer than the one loaded; load the model when any was."""
        changed = False
        for key, name, shape in zip(self.shapes, self._dense_names, self.shapes.values(),
                                    strict=True):  # fmt: skip
            r = got[name]
            if not r.found[0]:
                raise ModelNotReady(
                    f"model {self.label}: dense table {name!r} has no row at its partition's "
                    f"holder yet (still syncing, or the model was never published)"
                )
            version = int(r.versions[0])
            if r.values.shape[0] == 0 or version <= self._versions.get(name, -1):
                continue  # unchanged, or older than what is loaded (a lagging holder)
            numel = int(np.prod(shape))
            if r.values.shape[1] != numel:
                raise ModelNotReady(
                    f"model {self.label}: dense table {name!r} has dim {r.values.shape[1]}, "
                    f"the model expects {numel} (shape {shape})"
                )
            if not _finite(r.values[0]):
                raise self._refuse(name, f"NaN or infinite dense weights in table {name!r}")
            self._state[key] = np.array(r.values[0])  # decoded arrays are read-only
            self._versions[name] = version
            changed = True
        if self._model is None:
            self._model = DLRMServingModel(self.config, self._lookup, dense_state=self._state)
        elif changed:
            self._model.load_dense(self._state)
        else:
            return
        self.dense_loads += 1

    async def apredict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """dense float32 [B, N], sparse int64 [B, F] raw ids -> CTR float32 [B], as
        ``ReplicaModel.predict`` computes it from the holders' current rows."""
        cfg = self.config
        ids = np.asarray(sparse, dtype=np.int64)
        if cfg.dynamic is None:
            ids = ids % cfg.rows_per_table
        keys, bounds, inverse = unique_columns(np.ascontiguousarray(ids))
        ends = bounds.tolist()
        tables = {name: keys[ends[i] : ends[i + 1]] for i, name in enumerate(self._emb_names)}
        known = {}
        for name in self._dense_names:
            tables[name] = _KEY0
            if name in self._versions:
                known[name] = np.array([self._versions[name]], dtype=np.int64)
        got = await self.rows.lookup(tables, known)
        self._load_dense(got)
        batch: dict[str, np.ndarray] = {}
        for i, name in enumerate(self._emb_names):
            r = got[name]
            if r.values.shape[1] != cfg.embedding_dim:
                raise ModelNotReady(
                    f"model {self.label}: table {name!r} has dim {r.values.shape[1]}, the model "
                    f"expects embedding_dim={cfg.embedding_dim}"
                )
            if not _finite(r.values):
                bad = int(tables[name][np.flatnonzero(~np.isfinite(r.values).all(axis=1))[0]])
                raise self._refuse(name, f"NaN or infinite row of key {bad} in table {name!r}")
            batch[name] = r.values[inverse[:, i]]
        model = self.ensure_ready()
        self._batch = batch
        try:
            ctr = model.predict(dense, sparse)
        finally:
            self._batch = {}
        if not _finite(ctr):
            prefix = dense_table_name("", cfg.table_namespace)
            raise self._refuse(
                prefix,
                f"the forward pass overflowed: finite but huge weights in the {prefix!r} tables",
            )
        return ctr
