"""Which rows leave a table: TTL since the last update, LRU or LFU under the row budget (and
under a model's memory budget at its node, ``ekko.train.memory_budget``).

Scores follow HierarchicalKV's rule (the lowest score leaves first): LRU scores a row by the
step it was last looked up in training, LFU by its sightings since admission, halved after
every ``lfu_aging * row_budget`` sightings of the table (TinyLFU's aging: on a drifting
stream plain LFU keeps rows that were frequent once; ties: the least recently used). TTL
removes every row not updated for ``ttl_s`` of the table's clock, whatever the budget; with
``kind = "ttl"`` a full table admits no new id until rows expire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

EVICTION_KINDS = ("none", "lru", "lfu", "ttl")
EVICTION_REASONS = ("row_budget", "node_memory", "ttl")
"""Why a row left: its table's ``row_budget`` was full (LRU / LFU, idle rows included), its
model's memory budget at the node was (``MemoryBudget``), or it was not updated for
``ttl_s``."""


@dataclass(frozen=True)
class EvictionConfig:
    """How a table frees rows.

    ``kind``: ``"none"`` (a full table reads new ids from the default row), ``"lru"`` or
    ``"lfu"`` (a full table evicts its least recently / least frequently used rows for new
    ids), ``"ttl"`` (rows not updated for ``ttl_s`` leave). ``ttl_s`` is required by
    ``"ttl"`` and optional with ``"lru"`` / ``"lfu"``; it is in the units of the clock the
    table is given (seconds of ``time.monotonic`` by default, steps with a step clock).
    ``lfu_aging``: the rows' frequencies (LFU's score, and what makes a row idle for
    ``AdmissionConfig.idle_rows``) halve after every ``lfu_aging * row_budget`` sightings of
    the table; the faster the stream's ids fade, the lower it pays to set it (README).
    """

    kind: Literal["none", "lru", "lfu", "ttl"] = "lru"
    ttl_s: float | None = None
    lfu_aging: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in EVICTION_KINDS:
            raise ValueError(f"eviction.kind must be one of {EVICTION_KINDS}: {self.kind!r}")
        if self.kind == "ttl" and self.ttl_s is None:
            raise ValueError('eviction.ttl_s is required with kind = "ttl"')
        if self.ttl_s is not None and not 0 < self.ttl_s < 1e18:
            raise ValueError(f"eviction.ttl_s must be a positive finite time: {self.ttl_s}")
        if not 0 < self.lfu_aging <= 1e6:
            raise ValueError(f"eviction.lfu_aging must be in (0, 1e6]: {self.lfu_aging}")

    @property
    def evicts(self) -> bool:
        """Whether a table under this policy ever evicts (and so needs ``Sink.delete``)."""
        return self.kind != "none" or self.ttl_s is not None


def scores(kind: str, touched_step: np.ndarray, freq: np.ndarray) -> np.ndarray:
    """float64 [n]: each row's value under ``kind`` (``"lru"`` or ``"lfu"``), the lowest
    leaving first. LRU: the step the row was last looked up in. LFU: its aged frequency,
    ties broken by recency (the step's share of the latest step of the rows scored is in
    [0, 1)). Rows of several tables compare when their steps count on one clock and their
    frequencies age together (``MemoryBudget``)."""
    steps = touched_step.astype(np.float64)
    if kind == "lru":
        return steps
    latest = float(steps.max()) + 1.0 if steps.size else 1.0
    return freq.astype(np.float64) + steps / latest


def victims(
    kind: str, candidates: np.ndarray, touched_step: np.ndarray, freq: np.ndarray, k: int
) -> np.ndarray:
    """The ``k`` slots of ``candidates`` (int64 slots) with the lowest score under ``kind``
    (``"lru"`` or ``"lfu"``), or all of them when there are no more than ``k``."""
    if k <= 0:
        return candidates[:0]
    if candidates.size <= k:
        return candidates
    score = scores(kind, touched_step[candidates], freq[candidates])
    return candidates[np.argpartition(score, k - 1)[:k]]


def expired(occupied: np.ndarray, touched_at: np.ndarray, now: float, ttl: float) -> np.ndarray:
    """Slots of occupied rows last updated more than ``ttl`` before ``now``."""
    return np.flatnonzero(occupied & (touched_at < now - ttl))
