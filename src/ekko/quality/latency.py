"""Update-latency histogram: write at the origin → applied here, from row wall-clock stamps.

Rows arrive by the hundred thousand per second, so recording is one vectorised bincount
per chunk rather than a call per row; quantiles come from fixed log-spaced buckets (about 2 %
relative resolution) that merge across replicas by addition.
"""

from __future__ import annotations

import numpy as np

_EDGES_MS = np.concatenate([[0.0], np.geomspace(0.05, 600_000.0, 800)])


class LatencyHistogram:
    """Counts of latencies in log-spaced millisecond buckets; mergeable, resettable."""

    edges_ms = _EDGES_MS

    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES_MS), np.int64)  # last bucket: overflow
        self.total_ms = 0.0

    def record_ns(self, latencies_ns: np.ndarray) -> None:
        ms = np.maximum(np.asarray(latencies_ns, np.float64) / 1e6, 0.0)
        if ms.size == 0:
            return
        idx = np.searchsorted(_EDGES_MS, ms, side="right") - 1
        self.counts += np.bincount(idx, minlength=len(self.counts))[: len(self.counts)]
        self.total_ms += float(ms.sum())

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding quantile ``q`` (NaN when empty)."""
        n = self.count
        if n == 0:
            return float("nan")
        rank = np.searchsorted(np.cumsum(self.counts), q * n, side="left")
        rank = min(int(rank), len(_EDGES_MS) - 1)
        upper = _EDGES_MS[rank + 1] if rank + 1 < len(_EDGES_MS) else _EDGES_MS[-1]
        return float(upper)

    def merge(self, other: LatencyHistogram) -> LatencyHistogram:
        self.counts += other.counts
        self.total_ms += other.total_ms
        return self

    def since(self, earlier: LatencyHistogram) -> LatencyHistogram:
        """The latencies recorded after ``earlier`` was taken of this same histogram (a
        recent window: one burst then no longer pins a quantile for the rest of the run).
        A reset in between leaves counts below ``earlier``'s: then all of this one."""
        h = LatencyHistogram()
        diff = self.counts - earlier.counts
        if (diff < 0).any():
            return h.merge(self)
        h.counts[:] = diff
        h.total_ms = self.total_ms - earlier.total_ms
        return h

    def reset(self) -> None:
        self.counts[:] = 0
        self.total_ms = 0.0

    def to_dict(self) -> dict:
        return {"counts": self.counts.tolist(), "total_ms": self.total_ms}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyHistogram:
        h = cls()
        h.counts[:] = np.asarray(d["counts"], np.int64)
        h.total_ms = float(d["total_ms"])
        return h

    def summary(self) -> dict[str, float | None]:
        """Count and quantiles; ``None`` (JSON null) rather than NaN while empty."""
        if self.count == 0:
            return {"count": 0, "p50_ms": None, "p99_ms": None, "mean_ms": None}
        return {
            "count": self.count,
            "p50_ms": self.quantile(0.5),
            "p99_ms": self.quantile(0.99),
            "mean_ms": self.total_ms / self.count,
        }
