"""A restarted source rebuilds from its replicas before it takes writes (sans-IO).

Why: the source is the origin of versions. After a crash it holds what its snapshot and
write-ahead log kept, but replicas may hold more — rows it wrote but had not fsynced (never
acknowledged, yet replicated), or everything, when its data dir is lost. If it took writes
at once, its counters would issue versions replicas already hold for other rows, and those
replicas would never pull the new writes (issue 13 §2).

So a restarting source pulls from every replica with ``absorb`` pullers (cursors = what it
holds; rows of its own lineage only, last version wins) until each has nothing more. Its
counters then sit above every version any replica holds. If it came back on its own data
and absorbed every replica of the cluster, no replica holds a row it lacks and it keeps its
lineage (replicas take back what knowledge its disk did not back: ``ekko.store.settled``);
otherwise it starts a new lineage, and every replica, on meeting it, rebuilds from the
source exactly (``Puller``: rows the source lacks are dropped). Otherwise means: a replica
unreachable; or no data of its own — then what replicas' knowledge skipped (rows the old
source had superseded) may come back from another replica that held the older row, and no
disk tells which knowledge is still true.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from ekko.protocol.puller import Puller, PullerConfig
from ekko.store import Store

# One pull at a time, answered at once (no long-poll): the source waits on nothing else.
RECOVERY_PULLER = PullerConfig(wait_ms=0, window=1, poll_interval_ms=0, request_timeout_ms=5000)


def new_lineage() -> int:
    """A fresh lineage id: nonzero, 62 random bits (0 means "none yet")."""
    return secrets.randbits(62) | 1


@dataclass(frozen=True)
class RecoveryResult:
    lineage: int
    kept_lineage: bool  # False: replicas rebuild from the source
    absorbed: list[str]
    missing: list[str]  # unreachable, or another lineage
    rows_absorbed: int


@dataclass
class SourceRecovery:
    """One absorb puller per replica into ``store``; ``finish`` decides the lineage."""

    store: Store
    replicas: list[str]
    config: PullerConfig = RECOVERY_PULLER
    # Where a new lineage id comes from (a simulation passes its seeded generator's).
    lineages: Callable[[], int] = new_lineage
    pullers: dict[str, Puller] = field(init=False)

    def __post_init__(self) -> None:
        self.pullers = {r: Puller(self.store, self.config, absorb=True) for r in self.replicas}
        self._rows_before = self._rows()
        self._own_data = self.store.lineage != 0  # came back on its data dir, not empty
        self.reasons: dict[str, str] = {}
        self.failed: set[str] = set()

    def _rows(self) -> int:
        return sum(t.rows for t in self.store.tables.values())

    def reconnect(self, replica: str) -> None:
        """A fresh puller for a new link to ``replica`` (the old link broke or never came up);
        what was absorbed stays in the store, so it resumes from there."""
        self.pullers[replica] = Puller(self.store, self.config, absorb=True)

    def give_up(self, replica: str, reason: str) -> None:
        """``replica`` cannot be reached (or timed out): recover without it."""
        self.failed.add(replica)
        self.reasons[replica] = reason

    def done(self) -> bool:
        return all(p.caught_up or r in self.failed for r, p in self.pullers.items())

    def absorbed(self) -> list[str]:
        return [
            r
            for r, p in self.pullers.items()
            if p.caught_up and p.refused_lineage is None and r not in self.failed
        ]

    def finish(self) -> RecoveryResult:
        """Keep the lineage only if the source came back on its own data and every replica
        was absorbed; the origin then holds every version up to its counters
        (``Table.complete_origin``)."""
        for p in self.pullers.values():
            # A replica's key lists: what it no longer holds below its purge bars was
            # deleted, though a replica that slept through the purge may have given it back.
            p.reconciles.apply_due(self.store, every=True)
        absorbed = self.absorbed()
        missing = [r for r in self.replicas if r not in absorbed]
        kept = self._own_data and self.store.lineage != 0 and not missing
        if not kept:
            self.store.lineage = self.lineages()
        for t in self.store.tables.values():
            t.complete_origin()
        return RecoveryResult(
            self.store.lineage, kept, absorbed, missing, self._rows() - self._rows_before
        )
