"""Which shards one pull session asks for: those of the partitions its pulls name (issue 17).

Apart from the responder because it is one small rule — a session's partitions, under the
responder's placement, mapped to a shard mask per table and cached until they change — and a
partitioned cluster's every answer goes through it.
"""

from __future__ import annotations

import numpy as np

from ekko.store import Table
from ekko.store.placement import Placement


class SessionScope:
    """The partitions a session asked for (None: every shard) and each table's mask."""

    def __init__(self) -> None:
        self.partitions: tuple[int, ...] | None = None
        self._masks: dict[str, np.ndarray] = {}

    def ask(
        self,
        partitions: list[int] | None,
        placement: Placement | None,
        held: tuple[int, ...] | None = None,
    ) -> str | None:
        """The session's pulls name ``partitions`` from now on; returns why not (a partition
        the placement lacks, or none this node ``held`` — None: it holds every one),
        changing nothing, or None. One held among others is enough: a recovering source
        asks each replica for all of its partitions and takes what that one has."""
        parts = None if partitions is None else tuple(sorted(set(partitions)))
        if parts == self.partitions:
            return None
        total = placement.partitions if placement is not None else 1
        bad = [p for p in parts or () if p >= total]
        if bad:
            return (
                f"partitions {_shown(parts or ())} asked; this node's placement has {total} "
                f"(0..{total - 1})"
            )
        if parts and held is not None and not set(parts) & set(held):
            return (
                f"this node holds none of partitions {_shown(parts)} (it holds "
                f"{_shown(held)}): pull them from their holders"
            )
        self.partitions = parts
        self._masks.clear()
        return None

    def mask(self, table: Table, placement: Placement | None) -> np.ndarray | None:
        """bool [shards]: the shards of ``table`` the session asked for (None: all)."""
        if self.partitions is None or placement is None:
            return None
        mask = self._masks.get(table.name)
        if mask is None or mask.shape[0] != table.num_shards:
            parts = placement.partitions_of(table.name, table.num_shards)
            mask = self._masks[table.name] = np.isin(parts, self.partitions)
        return mask


def _shown(parts: tuple[int, ...]) -> str:
    """Partitions for an error, the first few of a long list (a pull may name many)."""
    if len(parts) <= 8:
        return f"[{', '.join(map(str, parts))}]"
    return f"[{', '.join(map(str, parts[:8]))}, ...] ({len(parts)} partitions)"
