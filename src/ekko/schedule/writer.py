"""The source's write path with the scheduler in it: lanes per row, held rows released later.

Why a class of its own: the node's HTTP writes, the trainer's publisher and the benches all
write at a source, and each must do the same lookup → plan → write in lanes → release held
rows on time; one writer keeps them from drifting apart.
"""

from __future__ import annotations

import numpy as np

from ekko.schedule.scheduler import UpdateScheduler
from ekko.store import Store, check_write_values


class ScheduledWriter:
    """Writes batches into ``store`` in the lanes ``scheduler`` chooses (all high without
    one). Held rows stay out of the table until ``release`` (call it at ``next_due``); the
    table keeps what replicas have or will get, so the next change is measured against that.
    Not thread-safe: one per source write path."""

    def __init__(self, store: Store, scheduler: UpdateScheduler | None = None) -> None:
        self.store = store
        self.scheduler = scheduler

    def write(
        self, table: str, keys: np.ndarray, values: np.ndarray, *, now: float, now_ns: int
    ) -> np.ndarray:
        """Write a batch at ``now`` (seconds, the scheduler's clock) stamped ``now_ns``;
        returns the versions of the rows written now (held rows are not written yet)."""
        t = self.store.table(table)
        if self.scheduler is None:
            return t.write(keys, values, now_ns=now_ns)
        keys = np.asarray(keys)
        values = np.asarray(values)
        check_write_values(values, table, t.max_abs)  # before the scheduler holds any
        old, _ver, found = t.lookup(keys)
        plan = self.scheduler.plan(table, keys, old, values, found, now)
        send = plan.send_now_mask
        if send.all():
            return t.write(keys, values, now_ns=now_ns, lanes=plan.lanes)
        return t.write(keys[send], values[send], now_ns=now_ns, lanes=plan.lanes[send])

    def release(self, now: float, now_ns: int) -> int:
        """Write the held rows whose staleness bound is reached; returns how many."""
        if self.scheduler is None:
            return 0
        return self._write_released(self.scheduler.due(now), now_ns)

    def flush(self, now_ns: int) -> int:
        """Write every held row (shutdown, or the end of a replay)."""
        if self.scheduler is None:
            return 0
        return self._write_released(self.scheduler.flush(), now_ns)

    def next_due(self) -> float | None:
        return None if self.scheduler is None else self.scheduler.next_due()

    def _write_released(self, released: list, now_ns: int) -> int:
        n = 0
        for r in released:
            self.store.table(r.table).write(r.keys, r.values, now_ns=now_ns, lanes=r.lanes)
            n += len(r)
        return n
