"""The vocabulary every layer shares: a table's shape, the lanes rows travel in, and the
``Sink`` rows are written to. It sits at the bottom so that the store, the protocol, the
scheduler and the trainer name the same things without importing each other."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec
import numpy as np

HIGH_LANE = 0
LOW_LANE = 1
NEW_LANE = 2  # keys no replica has seen: ahead of the high lane on a busy link
LANES = (HIGH_LANE, LOW_LANE, NEW_LANE)
NUM_LANES = len(LANES)


class TableSpec(msgspec.Struct, frozen=True, tag=True):
    """Shape of one table: every store shards it the same way."""

    name: str
    dim: int
    num_shards: int


@runtime_checkable
class Sink(Protocol):
    """Receiver of published rows (the source's write port, or a test double).

    ``create_table`` is called once per table before its first ``write``. ``write`` receives
    unique int64 keys [n] and float32 values [n, dim]; the arrays are fresh copies the sink
    may keep without copying again.
    """

    def create_table(self, spec: TableSpec) -> None: ...

    def write(self, table: str, keys: np.ndarray, values: np.ndarray) -> None: ...
