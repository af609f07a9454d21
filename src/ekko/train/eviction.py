"""Which rows leave a table: TTL since the last update, LRU, LFU or expected rate under the
row budget (and under a model's memory budget at its node, ``ekko.train.memory_budget``).

Scores follow HierarchicalKV's rule (the lowest score leaves first): LRU scores a row by the
step it was last looked up in training, LFU by its sightings since admission, halved after
every ``lfu_aging * row_budget`` sightings of the table (TinyLFU's aging: on a drifting
stream plain LFU keeps rows that were frequent once; ties: the least recently used).

``"rate"`` scores a row by the lookups it can be expected to get per step: its rate since
admission, ``sightings / (steps held + rate_prior_steps)`` (the prior keeps a row seen once
from passing for a busy one), times the chance that an id of that rate would have stayed
silent as long as it has, ``exp(-rate * silent_steps / rate_patience)``. One number thus
serves ids of every tempo: a steady tail id seen every minute keeps its row through a
minute's silence, while an item that was hot until a few seconds ago and stopped loses it
within a few of its own gaps. Aged LFU has one memory for all (items that faded linger for
as long as their aged counts take to halve away), LRU none at all.

TTL removes every row not updated for ``ttl_s`` of the table's clock, whatever the budget;
with ``kind = "ttl"`` a full table admits no new id until rows expire.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from ekko.train.fields import real

EVICTION_KINDS = ("none", "lru", "lfu", "rate", "ttl")
RANKED_KINDS = ("lru", "lfu", "rate")
"""The kinds that rank rows and evict the lowest for new ids when a table (or a memory
budget) is full."""
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
    ``"rate"`` ranks by expected lookups per step (module docstring): ``rate_prior_steps``
    is the steps of silence a new row's rate is averaged with, ``rate_patience`` how many
    of its own average gaps a row may stay silent before its score falls by ``1/e``.
    """

    kind: Literal["none", "lru", "lfu", "rate", "ttl"] = "lru"
    ttl_s: float | None = None
    lfu_aging: float = 10.0
    rate_prior_steps: float = 40.0
    rate_patience: float = 3.0

    def __post_init__(self) -> None:
        if self.kind not in EVICTION_KINDS:
            raise ValueError(f"eviction.kind must be one of {EVICTION_KINDS}: {self.kind!r}")
        if self.kind == "ttl" and self.ttl_s is None:
            raise ValueError('eviction.ttl_s is required with kind = "ttl"')
        if self.ttl_s is not None:
            real("eviction.ttl_s", self.ttl_s, 0, 1e18)
        real("eviction.lfu_aging", self.lfu_aging, 0, 1e6)
        # Lower bounds keep rate * silent / patience finite (1e-300 overflowed in numpy).
        real("eviction.rate_prior_steps", self.rate_prior_steps, 1e-10, 1e9)
        real("eviction.rate_patience", self.rate_patience, 1e-10, 1e6)

    @property
    def evicts(self) -> bool:
        """Whether a table under this policy ever evicts (and so needs ``Sink.delete``)."""
        return self.kind != "none" or self.ttl_s is not None


@dataclass(frozen=True)
class RowStats:
    """What the ranking knows of some rows, aligned arrays (int64): the step each was last
    looked up in, its aged frequency, the step it was admitted in, and its sightings since
    (not aged)."""

    touched_step: np.ndarray
    freq: np.ndarray
    born_step: np.ndarray
    sightings: np.ndarray

    @classmethod
    def concat(cls, parts: list[RowStats]) -> RowStats:
        names = [f.name for f in fields(cls)]
        return cls(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))


def scores(kind: str, rows: RowStats, step: int, config: EvictionConfig) -> np.ndarray:
    """float64 [n]: each row's value under ``kind`` (``RANKED_KINDS``) at ``step``, the
    lowest leaving first. LRU: the step the row was last looked up in. LFU: its aged
    frequency. Rate: its expected lookups per step (module docstring). LFU and rate break
    ties by recency (the step's share of the latest step of the rows scored, in [0, 1); a
    billionth of it for rate). Rows of several tables compare when their steps count on one
    clock and their frequencies age together (``MemoryBudget``)."""
    steps = rows.touched_step.astype(np.float64)
    if kind == "lru":
        return steps
    recency = steps / (float(steps.max()) + 1.0 if steps.size else 1.0)
    if kind == "lfu":
        return rows.freq.astype(np.float64) + recency
    held = step - rows.born_step.astype(np.float64)
    rate = rows.sightings / (np.maximum(held, 0.0) + config.rate_prior_steps)
    silent = np.maximum(step - steps, 0.0)
    return rate * np.exp(-rate * silent / config.rate_patience) + 1e-9 * recency


def victims(
    kind: str,
    candidates: np.ndarray,
    rows: RowStats,
    k: int,
    step: int,
    config: EvictionConfig,
) -> np.ndarray:
    """The ``k`` slots of ``candidates`` (int64 slots; ``rows`` their statistics, aligned)
    with the lowest score under ``kind`` at ``step``, or all of them when there are no
    more than ``k``."""
    if k <= 0:
        return candidates[:0]
    if candidates.size <= k:
        return candidates
    score = scores(kind, rows, step, config)
    return candidates[np.argpartition(score, k - 1)[:k]]


def expired(occupied: np.ndarray, touched_at: np.ndarray, now: float, ttl: float) -> np.ndarray:
    """Slots of occupied rows last updated more than ``ttl`` before ``now``."""
    return np.flatnonzero(occupied & (touched_at < now - ttl))
