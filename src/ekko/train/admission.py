"""Which new feature ids earn a row: count-based (after N sightings) or probabilistic.

Most ids a recommender sees never come back; giving each a row on first sight fills any
budget with one-off ids. Count-based admission (DeepRec's counter filter, TorchRec's
threshold filters) counts sightings in a bounded count-min sketch; probabilistic admission
(HugeCTR) admits each sighting with probability p. The sketch halves its counters after
every ``10 * width`` sightings (TinyLFU's reset), so it measures recent frequency and never
saturates into admitting everything on a long drifting stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from ekko.train.fields import integer, real

ADMISSION_KINDS = ("all", "count", "probability")
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class AdmissionConfig:
    """How a table admits new ids.

    ``kind``: ``"all"`` (every id gets a row), ``"count"`` (after ``threshold`` sightings,
    counted in a ``sketch_depth`` x ``sketch_width`` count-min sketch: an estimate never
    below the true count, so no id waits longer than ``threshold``), ``"probability"``
    (each sighting admits with ``probability``). ``seed`` draws the sketch's hashes and the
    coin flips, so runs repeat.

    ``idle_rows``: an id the policy turns away still gets a free row, or (under LRU / LFU
    eviction) the row of an idle id: one whose aged frequency is 0, i.e. not trained since
    the table's last aging or two (LRU among them). The filter then keeps new ids from
    evicting rows in use, not from rows nobody uses: a strict filter costs every id its
    first update (``ekko bench dynamic``'s stream: -0.0015 AUC with no budget at all), while
    an idle row is the cheapest victim there is (README "Dynamic tables").
    """

    kind: Literal["all", "count", "probability"] = "all"
    threshold: int = 2
    sketch_width: int = 1 << 16
    sketch_depth: int = 4
    probability: float = 0.5
    seed: int = 0
    idle_rows: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ADMISSION_KINDS:
            raise ValueError(f"admission.kind must be one of {ADMISSION_KINDS}: {self.kind!r}")
        integer("admission.threshold", self.threshold, 1, 2**62)
        integer("admission.sketch_width", self.sketch_width, 1, 1 << 26)
        integer("admission.sketch_depth", self.sketch_depth, 1, 16)
        real("admission.probability", self.probability, 0, 1)
        integer("admission.seed", self.seed, 0, 2**64 - 1)
        if not isinstance(self.idle_rows, bool):
            raise ValueError(f"admission.idle_rows must be true or false: {self.idle_rows!r}")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class CountMinSketch:
    """Approximate sighting counts of int64 ids in ``depth * width`` int32 counters.

    Why a sketch: counting every id ever seen exactly is the unbounded memory admission is
    there to prevent. An estimate is the minimum over the rows' counters, never below the
    true count since the last halving.
    """

    def __init__(self, width: int, depth: int, seed: int = 0) -> None:
        self.width = width
        self.depth = depth
        self.counts = np.zeros((depth, width), dtype=np.int32)
        salts = _mix(np.arange(1, depth + 1, dtype=np.uint64) * _GOLDEN + np.uint64(seed))
        self._salts = salts.reshape(depth, 1)
        self._rows = np.arange(depth).reshape(depth, 1)
        self._since_halving = 0

    def _buckets(self, ids: np.ndarray) -> np.ndarray:
        keys = np.asarray(ids, dtype=np.int64).view(np.uint64).reshape(1, -1)
        return (_mix(keys ^ self._salts) % np.uint64(self.width)).astype(np.intp)

    def add(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Count ``counts`` more sightings of unique ``ids``; returns their new estimates."""
        buckets = self._buckets(ids)
        rows = np.broadcast_to(self._rows, buckets.shape)
        add = np.broadcast_to(np.asarray(counts, dtype=np.int32), buckets.shape)
        np.add.at(self.counts, (rows, buckets), add)
        estimates = self.counts[rows, buckets].min(axis=0)
        self._since_halving += int(np.sum(counts))
        if self._since_halving >= 10 * self.width:
            self.counts >>= 1
            self._since_halving = 0
        return estimates

    def estimate(self, ids: np.ndarray) -> np.ndarray:
        """Estimated sightings of ``ids`` (never below the truth since the last halving)."""
        buckets = self._buckets(ids)
        return self.counts[np.broadcast_to(self._rows, buckets.shape), buckets].min(axis=0)


class Admission:
    """Decides, for ids sighted in a training step that hold no row, which get one.

    Why its own object: the policy's state (the sketch, the random generator) lives apart
    from the table's rows, and a table without admission pays nothing for it.
    """

    def __init__(self, config: AdmissionConfig) -> None:
        self.config = config
        self.sketch = (
            CountMinSketch(config.sketch_width, config.sketch_depth, config.seed)
            if config.kind == "count"
            else None
        )
        self._rng = np.random.default_rng(config.seed)

    def admit(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """bool [n]: which of the unique ``ids`` (sighted ``counts`` times in this step, none
        holding a row) are admitted."""
        cfg = self.config
        if cfg.kind == "all" or ids.size == 0:
            return np.ones(ids.shape, dtype=bool)
        if cfg.kind == "count":
            assert self.sketch is not None
            return self.sketch.add(ids, counts) >= cfg.threshold
        # each of the ``counts`` sightings admits with probability p
        p_any = 1.0 - np.power(1.0 - cfg.probability, counts.astype(np.float64))
        return self._rng.random(ids.size) < p_any
