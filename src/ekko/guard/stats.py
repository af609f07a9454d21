"""What a guard reports, as frozen records: the node's exporter reads these, never a guard.

Why records rather than the exporter walking the guards: the health machine, detector,
router and baseline store each keep their own state; a record taken at once is one
consistent reading, and a change to a guard's insides does not reach the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ekko.guard.state import State

if TYPE_CHECKING:
    from ekko.guard.replica_guard import ReplicaGuard
    from ekko.guard.source_guard import SourceGuard


@dataclass(frozen=True)
class ReplicaGuardStats:
    """A serving replica's guard of one model."""

    model: str
    state: State
    transitions: int
    score: float  # the detector's CUSUM score
    redirected: bool  # all traffic on the baseline
    baseline_queued_rows: int  # pulled rows waiting out the baseline's lag
    baseline_applied_rows: int
    judging: str  # no_samples, warming_up or judging


@dataclass(frozen=True)
class SourceGuardStats:
    """The source's guard of one model."""

    model: str
    state: State
    transitions: int
    rollbacks: int
    rows_restored: int
    preimage_rows: int


def replica_statistics(model: str, guard: ReplicaGuard) -> ReplicaGuardStats:
    return ReplicaGuardStats(
        model=model,
        state=guard.health.state,
        transitions=len(guard.health.history),
        score=float(guard.detector.score),
        redirected=bool(guard.router.redirected),
        baseline_queued_rows=int(guard.lagged.rows_queued),
        baseline_applied_rows=int(guard.lagged.rows_applied),
        judging=guard.judging,
    )


def source_statistics(model: str, guard: SourceGuard) -> SourceGuardStats:
    return SourceGuardStats(
        model=model,
        state=guard.health.state,
        transitions=len(guard.health.history),
        rollbacks=len(guard.incidents),
        rows_restored=int(guard.rows_restored),
        preimage_rows=int(guard.preimages.rows),
    )
