"""The guard's split of one predict batch between the online and the baseline variant, with
each variant read locally (``ReplicaModel``) or by scatter-gather (``ScatterReplica``).

Why apart from ``InferenceService``: a partitioned cluster's serving node reads both variants
from the partition holders (online rows from their stores, baseline rows from their lagged
stores), so the split must await two scatters, concurrently, where a replica's split computes
two local forwards; the service keeps the bookkeeping (pending predictions, counters) for
both paths in one place.
"""

from __future__ import annotations

import asyncio

import numpy as np

from ekko.serve.errors import ModelNotReady
from ekko.serve.replica import ReplicaModel
from ekko.serve.scatter_replica import ScatterReplica

Replica = ReplicaModel | ScatterReplica


def split_sync(
    online: Replica,
    base: Replica,
    d: np.ndarray,
    s: np.ndarray,
    to_base: np.ndarray,
    sampled: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(to_base, online scores, baseline scores)`` of a batch (NaN where a variant did not
    run). ``to_base`` (bool [B]) picks the events the baseline serves, ``sampled`` those both
    score. A baseline that cannot serve yet (``ModelNotReady``) leaves every event to the
    online variant, whose own ``ModelNotReady`` propagates."""
    n = d.shape[0]
    run_base = to_base | sampled
    full_base = np.full(n, np.nan, dtype=np.float32)
    try:
        if run_base.any():
            full_base[run_base] = base.predict(d[run_base], s[run_base])
    except ModelNotReady:
        to_base = np.zeros(n, bool)
    run_online = ~to_base | sampled
    full_online = np.full(n, np.nan, dtype=np.float32)
    if run_online.any():
        full_online[run_online] = online.predict(d[run_online], s[run_online])
    return to_base, full_online, full_base


async def _predict(replica: Replica, d: np.ndarray, s: np.ndarray) -> np.ndarray:
    if isinstance(replica, ScatterReplica):
        return np.asarray(await replica.apredict(d, s), dtype=np.float32)
    return np.asarray(replica.predict(d, s), dtype=np.float32)


async def _baseline(replica: Replica, d: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """The baseline's scores, or None when it cannot serve (not ready, or no holder of a
    partition keeps a baseline: ``PartitionUnavailable`` is a ``ModelNotReady``)."""
    try:
        return await _predict(replica, d, s)
    except ModelNotReady:
        return None


async def split_async(
    online: Replica,
    base: Replica,
    d: np.ndarray,
    s: np.ndarray,
    to_base: np.ndarray,
    sampled: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``split_sync`` with either variant read by scatter: both variants' lookups go out
    together. When the baseline cannot serve, the events it was to serve are scored online
    after (one more scatter, only then)."""
    n = d.shape[0]
    run_base = to_base | sampled
    run_online = ~to_base | sampled
    full_base = np.full(n, np.nan, dtype=np.float32)
    full_online = np.full(n, np.nan, dtype=np.float32)
    base_job = (
        asyncio.ensure_future(_baseline(base, d[run_base], s[run_base])) if run_base.any() else None
    )
    try:
        if run_online.any():
            full_online[run_online] = await _predict(online, d[run_online], s[run_online])
        got = await base_job if base_job is not None else None
    finally:
        if base_job is not None and not base_job.done():
            base_job.cancel()
    if got is not None:
        full_base[run_base] = got
    elif to_base.any():
        to_base = np.zeros(n, bool)
        rest = ~run_online
        if rest.any():
            full_online[rest] = await _predict(online, d[rest], s[rest])
    return to_base, full_online, full_base
