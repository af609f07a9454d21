"""Scheduling busy links (DESIGN.md §4–§5): update priority, high/low lanes, pacing, deferral.

- ``priority``: ``p = (p_g + p_u) * p_m`` — ``SignificanceTracker`` (p_g), ``TrafficShares``
  (p_m), ``DefaultPriority``, the pluggable ``PriorityFunction`` protocol;
- ``threshold``: ``StreamingPercentile`` (running q-quantile), ``LaneSplitter``;
- ``pacing``: ``TokenBucket``, ``LinkPacer`` (sizes pull answers on a link);
- ``deferral``: ``Deferrer`` (holds insignificant changes up to a staleness bound);
- ``drift``: ``DriftAccumulator`` (a row's drift since it last went in a first-drained lane);
- ``key_slots``: ``KeySlots`` (per-key numbers in fixed memory, for heat and drift);
- ``scheduler``: ``UpdateScheduler`` for the source write path;
- ``write_port``: ``WritePort``, the source's one write path (HTTP, trainer, release, restore).

Everything is sans-IO and clock-free: time-dependent calls take ``now``.
"""

from ekko.schedule.deferral import Deferrer, Released
from ekko.schedule.drift import DriftAccumulator
from ekko.schedule.pacing import LinkPacer, TokenBucket
from ekko.schedule.priority import (
    DEFAULT_MODEL,
    DefaultPriority,
    PriorityFunction,
    PriorityInputs,
    SignificanceTracker,
    TrafficShares,
    delta_norms,
)
from ekko.schedule.scheduler import (
    ReleasedRows,
    SchedulerConfig,
    SchedulerStats,
    UpdateScheduler,
    WritePlan,
)
from ekko.schedule.threshold import LaneSplitter, LaneStats, StreamingPercentile
from ekko.schedule.write_port import PreimageHook, WritePort

__all__ = [
    "DEFAULT_MODEL",
    "DefaultPriority",
    "Deferrer",
    "DriftAccumulator",
    "LaneSplitter",
    "LaneStats",
    "LinkPacer",
    "PreimageHook",
    "PriorityFunction",
    "PriorityInputs",
    "Released",
    "ReleasedRows",
    "SchedulerConfig",
    "SchedulerStats",
    "SignificanceTracker",
    "StreamingPercentile",
    "TokenBucket",
    "TrafficShares",
    "UpdateScheduler",
    "WritePlan",
    "WritePort",
    "delta_norms",
]
