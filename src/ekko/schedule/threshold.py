"""The running k-th percentile of priorities and the high/low lane split (DESIGN.md §4).

Updates at or above the running q-quantile of recent priorities go to the high lane, the rest
to the low lane, so about ``1 - q`` of the rows are high whatever the absolute scale of the
priorities is, and the split follows the stream as it drifts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ekko.schedule.priority import PriorityFunction, PriorityInputs
from ekko.store.spec import HIGH_LANE, LOW_LANE, NEW_LANE


class StreamingPercentile:
    """Running q-quantile over a stream of non-negative values, because a sort of the last
    million priorities per batch is far too slow and a plain EWMA of a quantile reacts badly
    to the heavy tails priorities have.

    A histogram with ``bins_per_decade`` log-spaced bins over ``[lo, hi)`` (plus one bin for
    values below ``lo`` — zeros, i.e. no-op changes — and one for values at or above ``hi``),
    whose weights decay by half every ``half_life_rows`` rows. An update is one ``bincount``
    (O(batch)); the threshold interpolates geometrically inside its bin, so its relative error
    is far below one bin's width (10^(1/bins_per_decade), 4.7 % at 50 per decade).
    """

    def __init__(
        self,
        q: float = 0.9,
        *,
        half_life_rows: float = 200_000.0,
        lo: float = 1e-9,
        hi: float = 1e9,
        bins_per_decade: int = 50,
    ) -> None:
        if not 0 < q < 1:
            raise ValueError(f"q must be in (0, 1), got {q}")
        if not half_life_rows > 0:
            raise ValueError(f"half_life_rows must be > 0, got {half_life_rows}")
        if not 0 < lo < hi or not math.isfinite(hi):
            raise ValueError(f"need 0 < lo < hi < inf, got lo={lo}, hi={hi}")
        if bins_per_decade < 1:
            raise ValueError(f"bins_per_decade must be >= 1, got {bins_per_decade}")
        self.q = float(q)
        self.half_life_rows = float(half_life_rows)
        self.lo = float(lo)
        self.hi = float(hi)
        self.bins_per_decade = int(bins_per_decade)
        self._log_lo = math.log10(lo)
        self._inner = math.ceil((math.log10(hi) - self._log_lo) * bins_per_decade)
        # bin 0: below lo; bins 1.._inner: log-spaced; bin _inner + 1: at or above hi
        self._counts = np.zeros(self._inner + 2, dtype=np.float64)
        self._cached: float | None = None
        self._rows = 0

    @property
    def weight(self) -> float:
        """Decayed number of values the histogram currently holds."""
        return float(self._counts.sum())

    @property
    def rows(self) -> int:
        """Values seen in total (undecayed)."""
        return self._rows

    def _bin_of(self, values: np.ndarray) -> np.ndarray:
        v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=self.hi)
        with np.errstate(divide="ignore"):
            pos = (np.log10(np.maximum(v, self.lo * 0.5)) - self._log_lo) * self.bins_per_decade
        idx = np.floor(pos).astype(np.int64) + 1
        idx[v < self.lo] = 0
        np.clip(idx, 0, self._inner + 1, out=idx)
        return idx

    def update(self, values: np.ndarray) -> None:
        """Add a batch of values (older weight decays by the batch's size first)."""
        v = np.asarray(values)
        n = v.shape[0] if v.ndim else 1
        if n == 0:
            return
        self._counts *= 0.5 ** (n / self.half_life_rows)
        self._counts += np.bincount(self._bin_of(v.reshape(-1)), minlength=self._counts.size)
        self._rows += n
        self._cached = None

    def threshold(self) -> float:
        """The current q-quantile; 0.0 while empty. A quantile that falls among the values
        below ``lo`` (mostly zeros) is reported as ``lo``: zero-priority rows never count as
        being at the threshold."""
        if self._cached is not None:
            return self._cached
        total = float(self._counts.sum())
        if total <= 0:
            return 0.0
        cum = np.cumsum(self._counts)
        target = self.q * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, self._counts.size - 1)
        if i == 0:
            t = self.lo
        elif i == self._counts.size - 1:
            t = self.hi
        else:
            below = float(cum[i - 1])
            frac = (target - below) / float(self._counts[i]) if self._counts[i] > 0 else 0.0
            frac = min(max(frac, 0.0), 1.0)
            t = 10.0 ** (self._log_lo + (i - 1 + frac) / self.bins_per_decade)
        self._cached = t
        return t


@dataclass(frozen=True)
class LaneStats:
    """Counters of a ``LaneSplitter`` (monotone, for Prometheus)."""

    batches: int
    rows_high: int
    rows_low: int
    threshold: float


class LaneSplitter:
    """Decides each row's lane from its priority and the running percentile, because the
    responder drains the high lane first: the top ``1 - q`` of updates cross a busy link at
    once, the rest wait and coalesce (never lost, DESIGN.md §4).

    Each batch is split with the threshold from *before* the batch, then folded into the
    percentile (and the priority function observes it): the split of a batch never depends
    on the batch itself, so a burst of large changes goes high as a whole. The one exception
    is the very first batch, which has no history: it is folded in first and split by its
    own quantile.

    Only updates of existing keys feed the percentile; new keys are ranked against it but do
    not move it. Otherwise a bulk load or a wave of new items (all carrying the freshness
    boost) lifts the threshold to the boost level and keeps ordinary updates out of the high
    lane for many half-lives afterwards — the boost would defeat itself exactly when new
    keys are many. Until some existing key was updated the threshold is 0: all rows go high.
    """

    def __init__(self, percentile: StreamingPercentile, priority_fn: PriorityFunction) -> None:
        self.percentile = percentile
        self.priority_fn = priority_fn
        self._batches = 0
        self._high = 0
        self._low = 0

    def lanes(self, inputs: PriorityInputs, *, observe: bool = True) -> np.ndarray:
        """uint8[n] lanes for ``inputs``: HIGH_LANE where priority >= threshold (NEW_LANE
        for a new key), LOW_LANE elsewhere.

        ``observe=False`` leaves the priority function's state alone (the caller observes a
        different set of rows, e.g. the scheduler observes deferred rows too).
        """
        n = len(inputs)
        prio = np.asarray(self.priority_fn(inputs), dtype=np.float64)
        if prio.shape != (n,):
            raise ValueError(f"priority function returned shape {prio.shape}, expected ({n},)")
        is_new = np.asarray(inputs.is_new, dtype=bool)
        ranked = prio[~is_new]
        if ranked.size and self.percentile.weight <= 0:
            self.percentile.update(ranked)
            t = self.percentile.threshold()
        else:
            t = self.percentile.threshold()
            self.percentile.update(ranked)
        high = prio >= t
        out = np.where(high, np.uint8(HIGH_LANE), np.uint8(LOW_LANE)).astype(np.uint8)
        # A new key above the threshold gets a lane of its own that crosses first: no replica
        # can serve it yet, and it must not wait behind a backlog of hot rows.
        out[high & is_new] = NEW_LANE
        if observe:
            self.priority_fn.observe(inputs)
        nh = int(np.count_nonzero(high))
        self._batches += 1
        self._high += nh
        self._low += n - nh
        return out

    def threshold(self) -> float:
        return self.percentile.threshold()

    def statistics(self) -> LaneStats:
        return LaneStats(self._batches, self._high, self._low, self.percentile.threshold())
