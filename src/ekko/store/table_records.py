"""What a ``Table`` hands out and what it calls: its result records and the hooks a store
installs on it.

Apart from ``table`` because their readers are not the table's: ``Collected`` is what a
responder's chunk collector and the reference model read, ``TableStats`` what the metrics
exporter reads, the hooks what the journal and the simulated network implement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ekko.store.table import Table

WriteHook = Callable[["Table", np.ndarray, np.ndarray, np.ndarray, int, np.ndarray], None]
"""Called after every source write with (table, keys, values, versions, now_ns, lanes)."""
DeleteHook = Callable[["Table", np.ndarray, np.ndarray, int], None]
"""Called after every source delete with (table, keys, versions, now_ns)."""
AdmitHook = Callable[["Table", np.ndarray], None]
"""Called with (table, keys) before any write, delete or apply stores them; raises to refuse
all of them (``ekko.store.holding``: shards held elsewhere, a memory budget)."""


@dataclass(frozen=True)
class Collected:
    """Result of ``Table.collect``: slots of m cursors, concatenated.

    Kept as flat arrays (not m small lists) so a pull over hundreds of shards costs a few
    allocations. Cursor i owns ``slots[offsets[i]:offsets[i + 1]]``, sorted by version.
    """

    slots: np.ndarray  # int64 [total]
    offsets: np.ndarray  # int64 [m + 1]
    full_scan: np.ndarray  # bool [m]: answered by a full scan rather than the cache

    def segment(self, i: int) -> np.ndarray:
        """Slots of cursor ``i``."""
        return self.slots[self.offsets[i] : self.offsets[i + 1]]

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)


@dataclass(frozen=True)
class TableStats:
    """Counters a metrics exporter reads; frozen so a reader never sees a half-updated set."""

    rows: int  # live rows
    capacity: int
    cache_hits: int
    full_scans: int
    rows_written: int
    rows_applied: int
    tombstones: int = 0  # deleted keys held with their versions (not served)
    rows_deleted: int = 0  # deletes written here (a source)
    tombstones_purged: int = 0  # tombstones forgotten (``purge``), their slots reused
    free_slots: int = 0  # row slots freed by purges, not taken again yet
    rows_reconciled: int = 0  # keys dropped by a reconcile: their delete was purged upstream
