"""The publisher's ``Sink`` over a ``Store``: how trained rows become versioned store writes.

The source node runs the trainer (or a model bootstrap) with a ``StoreSink`` over its own
store, so every published row gets a version and a write time and replicates like any other
write. ``on_write`` lets the node wake parked long-poll pulls after each write.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ekko.schedule.writer import ScheduledWriter
from ekko.store import Store
from ekko.store.spec import TableSpec

WriteHook = Callable[[], None]
"""``on_write()``: called after rows were written; the node passes ``notify_written``."""


class StoreSink:
    """Implements ``ekko.store.spec.Sink`` by writing into a ``Store``.

    Why a class of its own: the publisher must not know about versions, origins or long-poll
    wake-ups; the sink stamps each write with the wall-clock time (for update-latency
    accounting, DESIGN.md §2) and tells the node the store moved.

    Args:
        store: the source store (the origin of versions).
        on_write: optional hook called after every write, e.g. the node's ``notify_written``.
        clock_ns: wall-clock nanoseconds for the write time (inject one in tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        on_write: WriteHook | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        writer: ScheduledWriter | None = None,
    ) -> None:
        self.store = store
        self.writer = writer or ScheduledWriter(store)
        self.on_write = on_write
        self._clock_ns = clock_ns
        self.rows_written = 0

    def create_table(self, spec: TableSpec) -> None:
        """Create ``spec.name`` (idempotent for the same spec; a conflicting spec raises
        ``TableConflictError``)."""
        self.store.create_table(spec)

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None:
        """Write rows at the source; each gets a fresh version in its shard."""
        now_ns = self._clock_ns()
        self.writer.write(table, keys, values, now=now_ns / 1e9, now_ns=now_ns)
        self.rows_written += len(keys)
        if self.on_write is not None:
            self.on_write()

    def stored(self, table: str) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of every (key, value) the store holds of ``table``, None when it holds none:
        what a trainer restarted over this store resumes from (``TrainingService.bootstrap``)."""
        t = self.store.tables.get(table)
        if t is None or t.rows == 0:
            return None
        keys, values, *_ = t.all_rows()
        return keys.copy(), values.copy()
