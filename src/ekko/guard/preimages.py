"""Pre-images of embedding rows for rollback to the last healthy point, on plain arrays.

The store hands every write batch's *previous* row values here (``record``); the guard marks
healthy points (``mark_healthy``). A checkpoint is a cut in the sequence of ``record`` calls:
the records after checkpoint *i* and before checkpoint *i+1* form segment *i*. Within a
segment only the first pre-image per row is kept (:attr:`Coalesce.KEEP_FIRST`): that is the
row's value at the checkpoint. To restore checkpoint *i*, each row touched in segments *i, i+1,
…* goes back to its pre-image from the earliest of those segments that touched it.

Bounds: checkpoints older than ``window_s`` are dropped (except the newest, which is always the
current restore point), and when more than ``max_rows`` pre-images are held the oldest
checkpoints are dropped with their segments. Either way :attr:`PreimageLog.earliest_restorable`
moves forward; asking for an older point raises :class:`PreimageError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from ekko.guard.errors import GuardConfigError, PreimageError


class Coalesce(Enum):
    """Which of several writes to the same row a compacted record keeps.

    Why named: the two users want opposite things. A publisher sends the newest value
    (``KEEP_LAST``); a rollback needs the value from before the first write since the
    checkpoint (``KEEP_FIRST``). Getting them swapped is silent corruption, so it is spelled out.
    """

    KEEP_FIRST = "keep_first"
    KEEP_LAST = "keep_last"


def coalesce_indices(keys: np.ndarray, mode: Coalesce) -> np.ndarray:
    """Indices into ``keys`` of the kept entry per distinct key, in ascending key order."""
    k = np.asarray(keys)
    if mode is Coalesce.KEEP_FIRST:
        _, idx = np.unique(k, return_index=True)
        return idx
    _, idx = np.unique(k[::-1], return_index=True)
    return (k.size - 1 - idx).astype(np.int64)


class RestoreSet(NamedTuple):
    """What to write back: ``keys[i]`` gets ``values[i]``; where ``existed[i]`` is False the
    row did not exist at the checkpoint, so write the default row or delete it."""

    keys: np.ndarray
    values: np.ndarray
    existed: np.ndarray


@dataclass(frozen=True)
class RestorePlan:
    """A restore set plus the previous versions and the checkpoint it restores.

    Why separate from :class:`RestoreSet`: the store may want the old versions (for audit or
    to pick new, higher ones) while most callers only need keys, values and existence.
    """

    table: str
    checkpoint_at: float
    keys: np.ndarray
    values: np.ndarray
    versions: np.ndarray
    existed: np.ndarray


@dataclass(frozen=True)
class PreimageStats:
    """Size of the log at monotonic time ``at``.

    Why: operators need to see how far back a rollback can still go before they need it.
    """

    rows: int
    checkpoints: int
    earliest_restorable: float | None
    at: float


class _Chunks:
    """Pre-images of one table in one segment: a keep-first compacted, key-sorted part plus
    chunks appended since, merged when they outgrow it (amortised O(n log n))."""

    __slots__ = ("existed", "keys", "pending", "pending_rows", "values", "versions")

    def __init__(self, dim: int, dtype: np.dtype) -> None:
        self.keys = np.empty(0, np.int64)
        self.values = np.empty((0, dim), dtype)
        self.versions = np.empty(0, np.int64)
        self.existed = np.empty(0, bool)
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_rows = 0

    @property
    def rows(self) -> int:
        return int(self.keys.size) + self.pending_rows

    def add(
        self, keys: np.ndarray, values: np.ndarray, versions: np.ndarray, existed: np.ndarray
    ) -> None:
        self.pending.append((keys, values, versions, existed))
        self.pending_rows += int(keys.size)
        if self.pending_rows >= max(self.keys.size, 1024):
            self.compact()

    def compact(self) -> None:
        if not self.pending:
            return
        parts = [(self.keys, self.values, self.versions, self.existed), *self.pending]
        keys, values, versions, existed = (np.concatenate(col) for col in zip(*parts, strict=True))
        keep = coalesce_indices(keys, Coalesce.KEEP_FIRST)
        self.keys, self.values = keys[keep], values[keep]
        self.versions, self.existed = versions[keep], existed[keep]
        self.pending = []
        self.pending_rows = 0


class _Segment:
    __slots__ = ("at", "tables")

    def __init__(self, at: float) -> None:
        self.at = at
        self.tables: dict[str, _Chunks] = {}

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.tables.values())


class PreimageLog:
    """Bounded, keep-first pre-image log since the last healthy checkpoints.

    Why keep-first per checkpoint segment: a row written a thousand times since the healthy
    point needs only one pre-image to be rolled back, which keeps memory proportional to the
    number of distinct rows touched, not to the write rate. Why a time window and a row cap:
    rollback targets are minutes old; holding pre-images for hours would grow without bound.
    """

    def __init__(self, window_s: float = 3600.0, max_rows: int = 10_000_000) -> None:
        if not (window_s > 0):
            raise GuardConfigError(f"PreimageLog.window_s must be > 0, got {window_s!r}")
        if max_rows < 1:
            raise GuardConfigError(f"PreimageLog.max_rows must be >= 1, got {max_rows!r}")
        self.window_s = float(window_s)
        self.max_rows = int(max_rows)
        self.coalesce = Coalesce.KEEP_FIRST
        self._segments: list[_Segment] = []  # oldest first; segment i starts at checkpoint i
        # An upper bound of ``rows`` kept per write, so the row cap is checked in O(1); the
        # exact count (a sum over every segment and table) is taken only when it may bind.
        self._rows_bound = 0
        self._dims: dict[str, tuple[int, np.dtype]] = {}

    # -- properties ---------------------------------------------------------------------------

    @property
    def earliest_restorable(self) -> float | None:
        """Oldest checkpoint time still restorable, or ``None`` if none is.

        Moves forward when checkpoints age out of the window or are dropped to respect
        ``max_rows``; ``None`` before the first ``mark_healthy`` or after the writes since the
        newest checkpoint alone exceeded ``max_rows``.
        """
        if not self._segments:
            return None
        return self._segments[0].at

    @property
    def checkpoints(self) -> list[float]:
        return [s.at for s in self._segments]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self._segments)

    def stats(self, now: float) -> PreimageStats:
        return PreimageStats(self.rows, len(self.checkpoints), self.earliest_restorable, float(now))

    # -- writes -------------------------------------------------------------------------------

    def mark_healthy(self, now: float) -> None:
        """The current state is healthy: a new checkpoint to which ``restore_set`` can return."""
        now = float(now)
        if self._segments and now < self._segments[-1].at:
            raise ValueError(
                f"PreimageLog.mark_healthy: now {now} is before the last "
                f"checkpoint {self._segments[-1].at}"
            )
        self._segments.append(_Segment(now))
        self._expire(now)

    def record(
        self,
        table: str,
        keys: np.ndarray,
        prev_values: np.ndarray,
        prev_versions: np.ndarray,
        existed: np.ndarray,
        now: float,
    ) -> None:
        """Pre-images of one write batch: the rows' values and versions *before* the write.

        ``existed[i]`` is False for rows the write creates (their ``prev_values`` are ignored
        on restore). Within a batch, a repeated key keeps its first pre-image.
        """
        k = np.asarray(keys, np.int64).reshape(-1)
        v = np.asarray(prev_values)
        if v.ndim != 2 or v.shape[0] != k.size:
            raise ValueError(
                f"PreimageLog.record: prev_values must be (n, dim) with n = "
                f"{k.size} keys, got shape {v.shape}"
            )
        ver = np.asarray(prev_versions, np.int64).reshape(-1)
        ex = np.asarray(existed, bool).reshape(-1)
        if ver.size != k.size or ex.size != k.size:
            raise ValueError(
                f"PreimageLog.record: {k.size} keys but {ver.size} versions and "
                f"{ex.size} existed flags"
            )
        dim, dtype = self._dims.setdefault(table, (v.shape[1], v.dtype))
        if v.shape[1] != dim:
            raise ValueError(f"PreimageLog.record: table {table!r} has dim {dim}, got {v.shape[1]}")
        if not self._segments or k.size == 0:
            self._expire(float(now))
            return  # nothing to restore to: pre-images before any checkpoint are useless
        seg = self._segments[-1]
        chunks = seg.tables.get(table)
        if chunks is None:
            chunks = seg.tables[table] = _Chunks(dim, dtype)
        first = coalesce_indices(k, Coalesce.KEEP_FIRST)
        chunks.add(k[first], v[first].astype(dtype, copy=True), ver[first], ex[first])
        self._rows_bound += int(first.size)
        self._expire(float(now))

    def rolled_back(self, to_time: float) -> None:
        """The store now holds the state of the checkpoint at/before ``to_time``.

        Pre-images recorded after it are obsolete (their writes were undone): they are
        discarded, and that checkpoint becomes the newest, with an empty segment. Do not
        ``record`` the restore writes themselves.
        """
        i = self._index(to_time)
        del self._segments[i + 1 :]
        self._segments[i].tables.clear()
        self._rows_bound = self.rows

    # -- reads --------------------------------------------------------------------------------

    def restore_plan(self, table: str, to_time: float) -> RestorePlan:
        """Rows to write back to return ``table`` to the newest checkpoint at/before
        ``to_time``, with their previous versions."""
        i = self._index(to_time)
        parts = [c for s in self._segments[i:] if (c := s.tables.get(table)) is not None]
        for c in parts:
            c.compact()
        dim, dtype = self._dims.get(table, (0, np.dtype(np.float32)))
        if not parts:
            return RestorePlan(
                table,
                self._segments[i].at,
                np.empty(0, np.int64),
                np.empty((0, dim), dtype),
                np.empty(0, np.int64),
                np.empty(0, bool),
            )
        keys = np.concatenate([c.keys for c in parts])
        keep = coalesce_indices(keys, Coalesce.KEEP_FIRST)  # earliest segment wins
        return RestorePlan(
            table,
            self._segments[i].at,
            keys[keep],
            np.concatenate([c.values for c in parts])[keep],
            np.concatenate([c.versions for c in parts])[keep],
            np.concatenate([c.existed for c in parts])[keep],
        )

    def restore_set(self, table: str, to_time: float) -> RestoreSet:
        """``(keys, values, existed_mask)`` restoring ``table`` to the checkpoint at/before
        ``to_time``."""
        p = self.restore_plan(table, to_time)
        return RestoreSet(p.keys, p.values, p.existed)

    def tables(self) -> list[str]:
        return sorted(self._dims)

    # -- bounds -------------------------------------------------------------------------------

    def _index(self, to_time: float) -> int:
        earliest = self.earliest_restorable
        if earliest is None or to_time < earliest:
            raise PreimageError(
                f"cannot restore to t={to_time}: earliest restorable checkpoint is {earliest}"
            )
        times = np.fromiter((s.at for s in self._segments), np.float64, len(self._segments))
        return int(np.searchsorted(times, to_time, side="right")) - 1

    def _expire(self, now: float) -> None:
        # Time window: keep the newest checkpoint whatever its age (it is the restore point).
        cutoff = now - self.window_s
        drop = 0
        while drop < len(self._segments) - 1 and self._segments[drop].at < cutoff:
            drop += 1
        for seg in self._segments[:drop]:
            self._rows_bound -= seg.rows
        del self._segments[:drop]
        # Row cap: compact, then drop oldest checkpoints until under the cap.
        if self._rows_bound <= self.max_rows:
            return
        self._rows_bound = self.rows
        if self._rows_bound <= self.max_rows:
            return
        for s in self._segments:
            for c in s.tables.values():
                c.compact()
        total = self.rows
        while len(self._segments) > 1 and total > self.max_rows:
            total -= self._segments.pop(0).rows
        if total > self.max_rows:
            # Writes since the newest checkpoint alone exceed the cap: no restorable point
            # until the next mark_healthy.
            self._segments.clear()
        self._rows_bound = self.rows
