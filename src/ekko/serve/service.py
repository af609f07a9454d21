"""The inference service of one model on one node: predict, take feedback, report quality.

No HTTP here (``ekko.serve.routes`` is a thin layer over it) and no clock: every call takes
``now`` (monotonic seconds), so tests drive time. Predictions are served by a *variant*:
``online`` reads the replica's live store; the guard adds ``baseline`` (a lagged store) with
``add_variant`` and picks one per request. Quality is kept per variant, because the guard
compares the two (DESIGN.md §6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import numpy as np

from ekko.quality.windowed import WindowedQuality
from ekko.serve.errors import ModelNotReady, NonFiniteRows, UnknownVariant
from ekko.serve.guarded_split import split_async, split_sync
from ekko.serve.pending import PendingPredictions
from ekko.serve.replica import ReplicaModel
from ekko.serve.results import (
    BadInput,
    FeedbackResult,
    PredictResult,
    ServedModel,
    ServeStats,
)
from ekko.serve.scatter import PartitionedLookup
from ekko.serve.scatter_replica import ScatterReplica
from ekko.serve.schema import dense_out_of_range
from ekko.store import Store

ONLINE = "online"
BASELINE = "baseline"


class _Variant:
    """One servable copy of the model, its counters and its feedback quality."""

    def __init__(self, name: str, replica: ReplicaModel | ScatterReplica, window_s: float) -> None:
        self.name = name
        self.replica = replica
        self.quality = WindowedQuality(window_s)
        self.predictions = 0


class InferenceService:
    """Serves one DLRM from a node's store and scores it from feedback.

    Why one object per model: the HTTP handlers, the guard and the Prometheus exporter all
    need the same model state (replica, pending predictions, windowed quality); keeping it
    here keeps the handlers thin and the logic testable without a server.

    Not thread-safe: call it on the node's event loop, where rows are applied (``Table`` does
    not allow lookups concurrent with a write).

    Args:
        store: the replica's store (read live by the ``online`` variant).
        model: the served model's config (name and DLRM shape).
        window_s: span of the sliding quality window.
        max_pending: predictions remembered for feedback; the oldest are evicted first.
        rows: the partition holders' lookup: the ``online`` variant reads its rows through it
            (scatter-gather, awaited by ``apredict``) instead of ``store``. None (the
            default): the local replica.
    """

    def __init__(
        self,
        store: Store,
        model: ServedModel,
        *,
        window_s: float = 60.0,
        max_pending: int = 1_000_000,
        rows: PartitionedLookup | None = None,
    ) -> None:
        self.model = model
        self.name = model.name
        self.config = model.dlrm
        self.window_s = float(window_s)
        self._pending = PendingPredictions(max_pending)
        self._variants: dict[str, _Variant] = {}
        self._variant_names: list[str] = []
        self._requests = 0
        self._rows = 0
        self._predict_s = 0.0
        self._not_ready = 0
        self._nonfinite = 0
        self._feedback_requests = 0
        self._matched = 0
        self._unknown = 0
        self._split: tuple[Callable[[np.ndarray], np.ndarray], float] | None = None
        self.add_variant(ONLINE, store)
        if rows is not None:
            self._variants[ONLINE].replica = ScatterReplica(
                rows, self.config, f"{self.name}/online"
            )

    @property
    def scattered(self) -> bool:
        """Whether the online variant reads its rows from the partition holders."""
        return isinstance(self._variants[ONLINE].replica, ScatterReplica)

    def set_split(self, route: Callable[[np.ndarray], np.ndarray], shadow_share: float) -> None:
        """Serve through the guard's split from now on (see ``predict_guarded``)."""
        if BASELINE not in self._variants:
            raise ValueError(
                f"model {self.name}: the guard's split needs a {BASELINE!r} variant; add it first"
            )
        self._split = (route, shadow_share)

    # -- variants ----------------------------------------------------------------------------

    def add_variant(self, name: str, store: Store, rows: PartitionedLookup | None = None) -> None:
        """Serve ``name`` from ``store`` too (the guard's baseline reads a lagged store), or
        by scatter-gather through ``rows`` (the holders' lagged stores)."""
        if name in self._variants:
            raise ValueError(f"model {self.name}: variant {name!r} exists already")
        if len(self._variant_names) >= 255:
            raise ValueError(f"model {self.name}: at most 255 variants")
        label = f"{self.name}/{name}"
        replica: ReplicaModel | ScatterReplica = (
            ReplicaModel(store, self.config, label)
            if rows is None
            else ScatterReplica(rows, self.config, label)
        )
        self._variants[name] = _Variant(name, replica, self.window_s)
        self._variant_names.append(name)

    def replica_store(self, variant: str = ONLINE) -> Store:
        """The store ``variant`` serves from."""
        return self._variant(variant).replica.store

    def replace_store(self, store: Store, variant: str = ONLINE) -> None:
        """Serve ``variant`` from ``store`` from now on; its counters and quality carry on.

        A checkpoint-refreshed replica swaps in each full copy it loads this way."""
        v = self._variant(variant)
        v.replica = ReplicaModel(store, self.config, f"{self.name}/{variant}")

    @property
    def variants(self) -> list[str]:
        return list(self._variant_names)

    def _variant(self, name: str) -> _Variant:
        try:
            return self._variants[name]
        except KeyError:
            raise UnknownVariant(name, self.variants) from None

    def quality(self, variant: str = ONLINE) -> WindowedQuality:
        """The variant's windowed quality (the guard's detector reads it)."""
        return self._variant(variant).quality

    # -- predict -----------------------------------------------------------------------------

    def _check(self, dense: np.ndarray, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        d = np.ascontiguousarray(dense, dtype=np.float32)
        s = np.asarray(sparse)
        if s.dtype.kind not in "iu":
            raise BadInput(f"sparse: expected integer ids, got dtype {s.dtype}")
        s = np.ascontiguousarray(s, dtype=np.int64)
        if d.ndim != 2 or d.shape[1] != cfg.num_dense:
            raise BadInput(f"dense: expected shape [B, {cfg.num_dense}], got {list(d.shape)}")
        if s.ndim != 2 or s.shape[1] != cfg.num_sparse:
            raise BadInput(f"sparse: expected shape [B, {cfg.num_sparse}], got {list(s.shape)}")
        if d.shape[0] != s.shape[0]:
            raise BadInput(f"dense has {d.shape[0]} events, sparse {s.shape[0]}")
        if d.shape[0] == 0:
            raise BadInput("empty batch: send at least one event")
        at = dense_out_of_range(d, cfg.dense_limit)
        if at is not None:
            raise BadInput(
                f"dense[{at[0]}][{at[1]}]: {float(d[at])!r} is NaN, infinite or outside "
                f"[-{cfg.dense_limit:g}, {cfg.dense_limit:g}]"
            )
        return d, s

    def predict(
        self, dense: np.ndarray, sparse: np.ndarray, now: float, *, variant: str = ONLINE
    ) -> PredictResult:
        """CTR of each event from the variant's current rows; remembers them for feedback.

        dense float32 [B, num_dense], sparse int64 [B, num_sparse] raw ids. Keys the replica
        never saw read the store's zero row. Raises ``ModelNotReady`` until the dense tables
        have arrived, ``BadInput`` for wrong shapes or values.
        """
        if self._split is not None and variant == ONLINE:
            return self.predict_guarded(dense, sparse, now, *self._split)
        start = time.perf_counter()
        v = self._variant(variant)
        d, s = self._check(dense, sparse)
        try:
            ctr = np.asarray(v.replica.predict(d, s), dtype=np.float32)
        except ModelNotReady as exc:
            self._count_refusal(exc)
            raise
        return self._served(v, ctr, start)

    async def apredict(
        self, dense: np.ndarray, sparse: np.ndarray, now: float, *, variant: str = ONLINE
    ) -> PredictResult:
        """``predict`` for the routes: the same for a local replica; a variant served by
        scatter-gather awaits its rows from the partition holders (a partition with no live
        holder is ``PartitionUnavailable``, a 503 naming it)."""
        v = self._variant(variant)
        if not isinstance(v.replica, ScatterReplica):
            return self.predict(dense, sparse, now, variant=variant)
        if self._split is not None and variant == ONLINE:
            return await self.apredict_guarded(dense, sparse, now, *self._split)
        start = time.perf_counter()
        d, s = self._check(dense, sparse)
        try:
            ctr = np.asarray(await v.replica.apredict(d, s), dtype=np.float32)
        except ModelNotReady as exc:
            self._count_refusal(exc)
            raise
        return self._served(v, ctr, start)

    def _served(self, v: _Variant, ctr: np.ndarray, start: float) -> PredictResult:
        """Remember ``v``'s predictions for feedback and count them."""
        variant = v.name
        codes = np.full(ctr.shape[0], self._variant_names.index(variant), dtype=np.uint8)
        ids = self._pending.add(ctr, codes)
        v.predictions += int(ctr.shape[0])
        self._requests += 1
        self._rows += int(ctr.shape[0])
        self._predict_s += time.perf_counter() - start
        return PredictResult(ids=ids, ctr=ctr, variant=variant)

    def not_ready(self) -> str | None:
        """Why the online variant cannot predict yet (a dense table has not arrived), or
        None when it can: the Open Inference Protocol's model readiness."""
        try:
            self._variant(ONLINE).replica.ensure_ready()
        except ModelNotReady as exc:
            return str(exc)
        return None

    def _count_refusal(self, exc: ModelNotReady) -> None:
        if isinstance(exc, NonFiniteRows):
            self._nonfinite += 1
        else:
            self._not_ready += 1

    def predict_guarded(
        self,
        dense: np.ndarray,
        sparse: np.ndarray,
        now: float,
        route: Callable[[np.ndarray], np.ndarray],
        shadow_share: float,
    ) -> PredictResult:
        """Predict with the guard's split: ``route(seq) -> bool [B]`` picks the events the
        baseline serves. A ``shadow_share`` sample of events is also scored, unserved, by the
        other variant, so the guard compares online and baseline on enough labels even when
        the baseline serves well under 1 % of traffic (or, after a redirect, all of it).

        Falls back to plain online serving while the baseline is not servable (its lagged
        store has no model yet)."""
        start = time.perf_counter()
        d, s = self._check(dense, sparse)
        to_base, sampled = self._plan(d.shape[0], route, shadow_share)
        try:
            online, base = self._variants[ONLINE].replica, self._variants[BASELINE].replica
            split = split_sync(online, base, d, s, to_base, sampled)
        except ModelNotReady as exc:
            self._count_refusal(exc)
            raise
        return self._split_served(*split, sampled, start)

    async def apredict_guarded(
        self,
        dense: np.ndarray,
        sparse: np.ndarray,
        now: float,
        route: Callable[[np.ndarray], np.ndarray],
        shadow_share: float,
    ) -> PredictResult:
        """``predict_guarded`` with a variant read by scatter-gather (a partitioned cluster's
        serving node: online from the holders' stores, baseline from their lagged stores)."""
        start = time.perf_counter()
        d, s = self._check(dense, sparse)
        to_base, sampled = self._plan(d.shape[0], route, shadow_share)
        try:
            online, base = self._variants[ONLINE].replica, self._variants[BASELINE].replica
            split = await split_async(online, base, d, s, to_base, sampled)
        except ModelNotReady as exc:
            self._count_refusal(exc)
            raise
        return self._split_served(*split, sampled, start)

    def _plan(
        self, n: int, route: Callable[[np.ndarray], np.ndarray], shadow_share: float
    ) -> tuple[np.ndarray, np.ndarray]:
        to_base = np.asarray(route(self._pending.issued + np.arange(n, dtype=np.int64)), bool)
        return to_base, np.random.default_rng().random(n) < shadow_share

    def _split_served(
        self,
        to_base: np.ndarray,
        full_online: np.ndarray,
        full_base: np.ndarray,
        sampled: np.ndarray,
        start: float,
    ) -> PredictResult:
        n = to_base.shape[0]
        online, base = self._variants[ONLINE], self._variants[BASELINE]
        ctr = np.where(to_base, full_base, full_online).astype(np.float32)
        shadow = np.where(to_base, full_online, full_base).astype(np.float32)
        shadow[~sampled] = np.nan
        codes = np.where(
            to_base, self._variant_names.index(BASELINE), self._variant_names.index(ONLINE)
        ).astype(np.uint8)
        ids = self._pending.add(ctr, codes, shadow)
        n_base = int(to_base.sum())
        base.predictions += n_base
        online.predictions += n - n_base
        self._requests += 1
        self._rows += n
        self._predict_s += time.perf_counter() - start
        variant = BASELINE if n_base == n else ONLINE if n_base == 0 else "mixed"
        return PredictResult(ids=ids, ctr=ctr, variant=variant)

    # -- feedback ----------------------------------------------------------------------------

    def feedback(self, ids: np.ndarray, labels: np.ndarray, now: float) -> FeedbackResult:
        """Join 0/1 labels to their predictions and fold them into each variant's quality."""
        i = np.asarray(ids)
        y = np.asarray(labels)
        if i.dtype.kind not in "iu" or i.ndim != 1:
            raise BadInput(f"ids: expected a 1-D integer array, got {i.dtype} {list(i.shape)}")
        if y.shape != i.shape:
            raise BadInput(f"labels: expected {i.shape[0]} labels (one per id), got {y.size}")
        if y.size and not np.all((y == 0) | (y == 1)):
            raise BadInput("labels: every label must be 0 or 1")
        self._feedback_requests += 1
        joined = self._pending.take(i.astype(np.int64, copy=False))
        y_hit = y[joined.index].astype(np.int8)
        served = np.isfinite(joined.ctr)  # always, as predict refuses non-finite scores
        for code, name in enumerate(self._variant_names):
            mine = (joined.variant == code) & served
            if mine.any():
                self._variants[name].quality.update(joined.ctr[mine], y_hit[mine], now)
        if BASELINE in self._variants:  # shadow scores belong to the variant not served
            base_code = self._variant_names.index(BASELINE)
            for name, served_by_other in (
                (BASELINE, joined.variant != base_code),
                (ONLINE, joined.variant == base_code),
            ):
                pick = served_by_other & np.isfinite(joined.shadow)
                if pick.any():
                    self._variants[name].quality.update(joined.shadow[pick], y_hit[pick], now)
        matched = int(joined.index.shape[0])
        self._matched += matched
        self._unknown += joined.unknown
        return FeedbackResult(matched=matched, unknown=joined.unknown)

    # -- reading -----------------------------------------------------------------------------

    def metrics(self, now: float) -> dict[str, Any]:
        """Windowed and lifetime quality per variant, plus serving and feedback counts."""
        variants = {
            name: {
                "predictions": v.predictions,
                "window": v.quality.compute(now).as_json(),
                "lifetime": v.quality.lifetime(now).as_json(),
            }
            for name, v in self._variants.items()
        }
        return {
            "model": self.name,
            "window_s": self.window_s,
            "predictions_served": self._rows,
            "requests": self._requests,
            "feedback": {
                "matched": self._matched,
                "unknown": self._unknown,
                "pending": len(self._pending),
                "evicted": self._pending.evicted,
            },
            "variants": variants,
        }

    def statistics(self) -> ServeStats:
        return ServeStats(
            model=self.name,
            requests=self._requests,
            rows_predicted=self._rows,
            predict_seconds_total=self._predict_s,
            not_ready=self._not_ready,
            nonfinite=self._nonfinite,
            dense_loads=sum(v.replica.dense_loads for v in self._variants.values()),
            feedback_requests=self._feedback_requests,
            feedback_matched=self._matched,
            feedback_unknown=self._unknown,
            pending=len(self._pending),
            evicted=self._pending.evicted,
            predictions_by_variant=MappingProxyType(
                {name: v.predictions for name, v in self._variants.items()}
            ),
            at=time.monotonic(),
        )


def build_services(
    store: Store,
    models: list[ServedModel],
    *,
    window_s: float = 60.0,
    max_pending: int = 1_000_000,
    rows: PartitionedLookup | None = None,
) -> dict[str, InferenceService]:
    """One service per configured model, by name: what a ``serve = true`` node mounts
    (``rows``: every model reads its rows from the partition holders)."""
    return {
        m.name: InferenceService(store, m, window_s=window_s, max_pending=max_pending, rows=rows)
        for m in models
    }
