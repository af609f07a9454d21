"""When a scatter hedges and whom it asks first: ``ScatterConfig`` and what a serving node
learned of each partition's holders.

Each partition keeps the time of its last answers (``LatencyWindow``: the hedge delay is
their p95), the holders that failed or lost to another holder lately (asked last for a
while) and its counters. ``HolderPolicy`` owns that state, shared by every scatter of one
``ekko.serve.scatter.PartitionedLookup``; the lookup itself only asks, waits and tells it
what happened.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ScatterConfig:
    """How a batch is scattered: ``deadline_s`` for the whole batch; a partition's request is
    hedged after its p95 (``quantile``) over its last ``window`` answers, never sooner than
    ``hedge_min_s``, and after ``hedge_initial_s`` until ``min_samples`` answers were seen;
    a holder that failed, or was still silent when another answered, is tried last for
    ``suspect_s`` (a stalled holder never fails: asked first by every batch, it made each
    answer wait the hedge delay, and the p95 of those answers pushed the delay up to the
    deadline). ``coalesce``: lookups arriving
    while a scatter is in flight are merged, at most that many, into the next one
    (``ekko.serve.scatter_batch``); 0 sends each lookup on its own."""

    deadline_s: float = 1.0
    hedge_initial_s: float = 0.05
    hedge_min_s: float = 0.001
    quantile: float = 0.95
    window: int = 256
    min_samples: int = 20
    suspect_s: float = 2.0
    coalesce: int = 16

    def __post_init__(self) -> None:
        for name in ("deadline_s", "hedge_initial_s", "hedge_min_s", "suspect_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s: expected > 0, got {self.deadline_s!r}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile: expected in (0, 1], got {self.quantile!r}")
        if (
            isinstance(self.coalesce, bool)
            or not isinstance(self.coalesce, int)
            or not (0 <= self.coalesce <= 1024)
        ):
            raise ValueError(f"coalesce: expected an integer in [0, 1024], got {self.coalesce!r}")
        if self.window < 1 or self.min_samples < 1 or self.min_samples > self.window:
            raise ValueError(
                f"window and min_samples: expected 1 <= min_samples <= window, got "
                f"window={self.window!r} min_samples={self.min_samples!r}"
            )


class LatencyWindow:
    """The last ``size`` answer times of one partition and their quantile (the hedge delay).

    Why the time to the partition's answer (hedged or not) rather than each request's: a
    request that lost to its hedge never reports its own time, and the answers alone would
    drift the quantile down to the hedges' times. Kept sorted as well as in arrival order:
    every batch adds a sample and reads the quantile, and ``np.quantile`` of the window each
    time cost a serving node more CPU than the rest of the scatter's bookkeeping.
    """

    def __init__(self, size: int, quantile: float) -> None:
        self._samples: deque[float] = deque()
        self._sorted: list[float] = []
        self.size = size
        self.quantile = quantile

    def add(self, seconds: float) -> None:
        if len(self._samples) == self.size:
            del self._sorted[bisect.bisect_left(self._sorted, self._samples.popleft())]
        self._samples.append(seconds)
        bisect.insort(self._sorted, seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def value(self) -> float:
        """The quantile of the samples, interpolated linearly as ``np.quantile`` does (0
        with none)."""
        s = self._sorted
        if not s:
            return 0.0
        pos = self.quantile * (len(s) - 1)
        lo = int(pos)
        if lo + 1 >= len(s):
            return s[lo]
        return s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class PartitionStats:
    """Counters of one partition's lookups: batches asked, answered, hedges and retries
    sent, batches no holder answered, and the current hedge delay."""

    partition: int
    requests: int
    answered: int
    hedges: int
    retries: int
    unavailable: int
    hedge_after_s: float


class PartitionCounters:
    """One partition's running counts (``PartitionStats`` is their frozen reading)."""

    def __init__(self) -> None:
        self.requests = self.answered = self.hedges = self.retries = self.unavailable = 0


class HolderPolicy:
    """Each partition's hedge delay, the order its holders are asked in, and its counters.

    Why apart from the lookup: this is what every scatter of a serving node shares and
    learns from (answer times, holders that failed or stalled); the lookup's asking and
    waiting is per scatter and keeps no state of its own.

    Args:
        holders: partition -> its holders, in order of preference.
        config: the hedging and suspicion settings (``ScatterConfig``).
    """

    def __init__(self, holders: Mapping[int, Sequence[str]], config: ScatterConfig) -> None:
        self.holders = {p: list(hs) for p, hs in holders.items()}
        self.config = config
        self._windows = {p: LatencyWindow(config.window, config.quantile) for p in holders}
        self.counters = {p: PartitionCounters() for p in holders}
        self._suspect: dict[str, float] = {}  # holder -> loop time until which it goes last

    def hedge_after(self, partition: int) -> float:
        """Seconds a request to ``partition`` waits before it is hedged."""
        cfg = self.config
        w = self._windows[partition]
        if len(w) < cfg.min_samples:
            return cfg.hedge_initial_s
        return max(cfg.hedge_min_s, w.value())

    def order(self, partition: int, now: float) -> list[str]:
        """The partition's holders, those that failed lately last."""
        hs = self.holders[partition]
        ok = [h for h in hs if self._suspect.get(h, -math.inf) <= now]
        return ok + [h for h in hs if h not in ok]

    def answered(
        self, partition: int, holder: str, seconds: float, slower: Iterable[str], now: float
    ) -> None:
        """``holder`` answered the partition ``seconds`` after it was first asked; the
        holders ``slower`` were asked too and had not answered (they lost to a hedge or a
        retry): they go last for ``suspect_s``."""
        self._windows[partition].add(seconds)
        self._suspect.pop(holder, None)
        for h in slower:
            self._suspect[h] = now + self.config.suspect_s
        self.counters[partition].answered += 1

    def failed(self, holder: str, now: float) -> None:
        """``holder`` failed: it goes last for ``suspect_s``."""
        self._suspect[holder] = now + self.config.suspect_s

    def statistics(self) -> list[PartitionStats]:
        return [
            PartitionStats(
                p, c.requests, c.answered, c.hedges, c.retries, c.unavailable, self.hedge_after(p)
            )
            for p, c in sorted(self.counters.items())
        ]
