"""The source-side update scheduler: one call per write batch decides lanes and deferral.

Write path at the source (``ekko.schedule.write_port.WritePort`` does this; the scheduler does
no I/O and owns no table)::

    old, _, existed = table.lookup(keys)
    plan = scheduler.plan(table.name, keys, old, new, existed, now)
    table.write(keys[plan.send_now_mask], new[plan.send_now_mask], now_ns=...,
                lanes=plan.lanes[plan.send_now_mask])
    ...
    for r in scheduler.due(now):          # on a timer: scheduler.next_due()
        store.table(r.table).write(r.keys, r.values, now_ns=..., lanes=r.lanes)

``old`` must be what the table holds (the value replicas have or will get), not what the
producer held before its step: with deferral, a held row is not in the table, so its next
change is measured against what replicas last received and drift cannot accumulate unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ekko.schedule.deferral import Deferrer, Released
from ekko.schedule.drift import DriftAccumulator
from ekko.schedule.priority import (
    DefaultPriority,
    HotKeyPriority,
    PriorityFunction,
    PriorityInputs,
    SignificanceTracker,
    TrafficShares,
    delta_norms,
)
from ekko.schedule.threshold import LaneSplitter, StreamingPercentile
from ekko.store.spec import HIGH_LANE, LANES, LOW_LANE

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class SchedulerConfig(BaseModel):
    """Scheduler settings, validated once, on construction, each refusal naming the field.

    Why a pydantic model: the node's ``[scheduler]`` section *is* this model (with
    ``enabled`` off by default), so the rules are said once, here, and a bad config fails
    at start-up with the field's name, not on the first write; code building one directly
    (benches, tests) gets the same checks.

    - ``enabled``: off → every row HIGH and sent now (the "no scheduler" baseline).
    - ``percentile``: q; rows with priority at or above the running q-quantile go HIGH.
    - ``freshness_boost``: p_u of a key the table did not hold.
    - ``defer``: hold rows with p_g < ``defer_min_significance`` (existing keys only) for at
      most ``max_staleness_s``; released rows are written in ``release_lane`` (HIGH by
      default: they already waited as long as allowed).
    - ``half_life_rows``: memory of the lane percentile; ``significance_half_life_rows``:
      memory of the running mean |Δ| (longer, see ``SignificanceTracker``); ``sample_rows``:
      rows sampled per batch for the mean; ``seed``: the sampling seed (same seed + same
      inputs → same lanes).
    - ``significance_scope``: normalise |Δ| per "table" or per "model".
    - ``hot_keys``: weight priorities by each key's recent write rate (``HotKeyPriority``);
      ``read_by_all``: table prefixes every prediction reads, weighted as the hottest key.
    - ``accumulate_drift``: rank a write by its row's drift since the row last went in a
      first-drained lane, not by its own step (``DriftAccumulator``); deferral then holds a
      row only while that drift, not just the step, is insignificant.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    percentile: float = Field(0.9, gt=0, lt=1)
    freshness_boost: NonNegative = 10.0
    defer: bool = False
    defer_min_significance: NonNegative = 0.05
    max_staleness_s: NonNegative = 5.0
    release_lane: Literal[LANES] = HIGH_LANE  # type: ignore[valid-type]
    half_life_rows: Positive = 200_000.0
    significance_half_life_rows: Positive = 2_000_000.0
    sample_rows: int = Field(4096, ge=1)
    significance_scope: Literal["table", "model"] = "table"
    traffic_window_s: Positive = 60.0
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    hot_keys: bool = False
    read_by_all: tuple[str, ...] = ("dense/",)
    accumulate_drift: bool = False


@dataclass(frozen=True)
class WritePlan:
    """What to do with one write batch: write rows ``send_now_mask`` now, row i in lane
    ``lanes[i]`` (lanes of held rows are LOW and unused)."""

    lanes: np.ndarray
    send_now_mask: np.ndarray

    @property
    def rows_now(self) -> int:
        return int(np.count_nonzero(self.send_now_mask))


@dataclass(frozen=True)
class ReleasedRows:
    """Held rows due now: write ``values`` at ``keys`` of ``table`` in ``lanes``."""

    table: str
    keys: np.ndarray
    values: np.ndarray
    lanes: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])


@dataclass(frozen=True)
class SchedulerStats:
    """Counters (monotone) and gauges of the scheduler, for Prometheus."""

    rows_planned: int
    rows_high: int  # written now in the high or the new-key lane
    rows_low: int
    rows_deferred: int  # holds started (counter)
    rows_released: int  # held rows released (counter)
    rows_held: int  # held right now (gauge)
    threshold: float
    mean_delta: dict[str, float] = field(default_factory=dict)  # scope -> running mean |Δ|
    rows_by_lane: tuple[int, ...] = (0,) * len(LANES)  # written now (released too), by lane


class UpdateScheduler:
    """Decides, for each batch the source writes, which rows go in the high lane and which
    are held back, because on a busy WAN link the changes that matter most must cross first
    and tiny ones may wait and coalesce (DESIGN.md §4–§5). One per source node, called from
    its (single) write path; not thread-safe.

    ``priority_fn`` replaces the default ``(p_g + p_u) * p_m``; deferral still uses the
    built-in significance tracker (p_g), which the scheduler keeps up to date either way.
    """

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        *,
        traffic: TrafficShares | None = None,
        priority_fn: PriorityFunction | None = None,
    ) -> None:
        self.config = cfg = config or SchedulerConfig()
        self.traffic = traffic or TrafficShares(window_s=cfg.traffic_window_s)
        self.significance = SignificanceTracker(
            half_life_rows=cfg.significance_half_life_rows, sample=cfg.sample_rows, seed=cfg.seed
        )
        self.default_priority = DefaultPriority(
            self.significance,
            self.traffic,
            cfg.freshness_boost,
            scope="table" if cfg.significance_scope == "table" else "model",
        )
        if priority_fn is None and cfg.hot_keys:
            priority_fn = HotKeyPriority(
                self.default_priority,
                half_life_rows=cfg.half_life_rows,
                read_by_all=cfg.read_by_all,
            )
        self.priority_fn: PriorityFunction = priority_fn or self.default_priority
        self.splitter = LaneSplitter(
            StreamingPercentile(cfg.percentile, half_life_rows=cfg.half_life_rows),
            self.priority_fn,
        )
        self.deferrer = Deferrer(cfg.defer_min_significance, cfg.max_staleness_s)
        self.drift = DriftAccumulator() if cfg.accumulate_drift else None
        self._planned = 0
        self._high = 0
        self._low = 0
        self._by_lane = np.zeros(len(LANES), np.int64)

    def plan(
        self,
        table: str,
        keys: np.ndarray,
        old_values: np.ndarray,
        new_values: np.ndarray,
        existed: np.ndarray,
        now: float,
        *,
        hold: bool = True,
    ) -> WritePlan:
        """Plan one write batch of ``table``.

        ``old_values``: what the table holds for each key (zeros where absent), ``existed``:
        bool[n], whether it holds the key (``Table.lookup``'s ``found``). Rows outside
        ``send_now_mask`` are held and come back from ``due``/``flush``; none is lost.
        ``hold`` False: no row of this batch is held (an earlier hold of its keys ends).
        """
        k = np.asarray(keys)
        n = k.shape[0]
        ex = np.asarray(existed, dtype=bool)
        if ex.shape != (n,):
            raise ValueError(f"existed must have shape ({n},), got {ex.shape}")
        if not self.config.enabled:
            self._planned += n
            self._high += n
            self._by_lane[HIGH_LANE] += n
            return WritePlan(np.full(n, HIGH_LANE, np.uint8), np.ones(n, dtype=bool))
        new = np.asarray(new_values)
        step = delta_norms(old_values, new)
        moved = step if self.drift is None else np.where(ex, self.drift.drift(table, k, step), step)
        inputs = PriorityInputs(table, k, moved, ~ex)
        if self.config.defer:
            p_g = self.default_priority.significance_of(inputs)
            eligible = ex if hold else np.zeros(n, dtype=bool)
            send = self.deferrer.split(table, k, p_g, now, values=new, eligible=eligible)
        else:
            send = np.ones(n, dtype=bool)
        lanes = np.full(n, LOW_LANE, np.uint8)
        if send.all():
            lanes = self.splitter.lanes(inputs, observe=False)
        elif send.any():
            lanes[send] = self.splitter.lanes(inputs.subset(send), observe=False)
        if self.drift is not None:
            self.drift.settle(table, k[send], step[send], lanes[send])
        # p_g's scale comes from every change, sent or held: observing only sent rows would
        # raise the mean, defer more, raise it again.
        self.priority_fn.observe(inputs)
        if self.priority_fn is not self.default_priority:
            self.default_priority.observe(inputs)
        nh = int(np.count_nonzero(lanes[send] != LOW_LANE))
        self._planned += n
        self._high += nh
        self._low += int(np.count_nonzero(send)) - nh
        self._by_lane += np.bincount(lanes[send], minlength=len(LANES))
        return WritePlan(lanes, send)

    def replicas_in_sync(self) -> None:
        """Every replica holds the source's rows now (a bootstrap, a full copy): no row has
        drifted from what they hold."""
        if self.drift is not None:
            self.drift = DriftAccumulator()

    def restored(self, table: str, keys: np.ndarray) -> int:
        """A rollback wrote ``keys`` of ``table`` past the scheduler (every replica gets them
        at once): rows held for them are dropped, never released over the restored values,
        and their drift starts from zero. Returns how many held rows were dropped."""
        k = np.asarray(keys)
        if self.drift is not None:
            n = k.shape[0]
            self.drift.settle(table, k, np.zeros(n), np.full(n, HIGH_LANE, np.uint8))
        return self.deferrer.discard(table, k)

    def deleted(self, table: str, keys: np.ndarray) -> int:
        """``keys`` of ``table`` were deleted (tombstones, past the scheduler, as a restore):
        rows held for them are dropped, never released to bring the keys back, and their
        drift starts from zero. Returns how many held rows were dropped."""
        return self.restored(table, keys)

    def due(self, now: float) -> list[ReleasedRows]:
        """Held rows whose staleness bound is reached at ``now``; write them."""
        return [self._released(r) for r in self.deferrer.due(now)]

    def flush(self) -> list[ReleasedRows]:
        """Every held row (shutdown, or before turning deferral off)."""
        return [self._released(r) for r in self.deferrer.flush()]

    def next_due(self) -> float | None:
        """When ``due`` should next be called (None: nothing held)."""
        return self.deferrer.next_due()

    def _released(self, r: Released) -> ReleasedRows:
        assert r.values is not None  # plan() always hands the deferrer values
        lanes = np.full(len(r), self.config.release_lane, np.uint8)
        self._by_lane[self.config.release_lane] += len(r)
        if self.drift is not None:
            self.drift.settle(r.table, r.keys, np.zeros(len(r)), lanes)
        return ReleasedRows(r.table, r.keys, r.values, lanes)

    def statistics(self) -> SchedulerStats:
        return SchedulerStats(
            rows_planned=self._planned,
            rows_high=self._high,
            rows_low=self._low,
            rows_deferred=self.deferrer.rows_deferred,
            rows_released=self.deferrer.rows_released,
            rows_held=self.deferrer.held(),
            threshold=self.splitter.threshold(),
            mean_delta=self.significance.means(),
            rows_by_lane=tuple(int(n) for n in self._by_lane),
        )
