"""Sharded ranks through a rollback: all ranks pause while the sources are quarantined, then
each reloads the restored rows it owns and training goes on (issue 17, the guard on a
partitioned cluster).

When the guard rolls a model back, every partition's source refuses the model's writes for a
while (409, ``Quarantined``: the rollback's epoch and the quarantine's end) and writes back
its healthy rows. A rank learns of it from a refused publish, but only the ranks whose
writes reached a quarantined source do: so every step starts with one ``all_reduce(MAX)`` of
``[epoch, until_ms, -now_ms, unloaded]`` (int64), and every rank decides from the reduced
values alone, so all take the same branch (a rank that trained while another dropped its
batch would hang the all_to_all). From a rise of the epoch (or of the quarantine's end: a
restarted coordinator may number epochs afresh) every rank drops its batches and holds its
sinks (queued writes dropped: the poisoned steps' rows are never retried); once the
slowest-clocked rank's now is past ``until`` each reloads its owned rows of every table from
its partitions' sources (``SourceReader``; rank 0 the dense tensors too), resets the Adagrad
state of every row the reload changed, and reports done in the next step's reduce. When
every rank reloaded, rank 0's dense tensors are broadcast (every replica the same values, a
fresh dense optimizer) and training goes on. A rank that cannot reload (a source down)
retries with a backoff, logging each failure, and every rank keeps dropping meanwhile:
no rank trains on the poisoned weights past the quarantine.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from ekko.client.errors import ClientError, Quarantined
from ekko.client.wire import TableRows

log = logging.getLogger(__name__)


class RowSource(Protocol):
    """What a rank reads restored rows from: a partition source's ``Client`` (reader role,
    ``POST /v1/lookup``)."""

    def lookup_many(self, tables: Mapping[str, np.ndarray]) -> dict[str, TableRows]: ...


Split = Callable[[str, np.ndarray], list[tuple[int, np.ndarray]]]
"""(table, keys) -> [(partition, positions of keys in it)]: ``PartitionRouter.split``."""


class ReloadFailed(RuntimeError):
    """A rank could not read its rows back (a source down, a refusal): it retries."""


class SourceReader:
    """Reads rows of several tables from the sources of their partitions, in multi-table
    lookups of at most ``max_bytes`` of answer each (the node's body limit).

    Why chunked by the answer: a rank reloads every row it owns at once (millions), far
    more than one request may carry.

    Args:
        sources: partition -> its source (a ``Client``).
        split: where each key of a table lives (None: every key at the one source).
        dims: each table's row length (to size the chunks).
        max_bytes: the largest answer of one lookup.
    """

    def __init__(
        self,
        sources: Mapping[int, RowSource],
        split: Split | None,
        dims: Mapping[str, int],
        max_bytes: int = 8 << 20,
    ) -> None:
        if not sources:
            raise ValueError("SourceReader needs at least one source")
        if split is None and len(sources) != 1:
            raise ValueError(f"without a split, one source only (got {sorted(sources)})")
        if max_bytes < 1024:
            raise ValueError(f"max_bytes must be >= 1024, got {max_bytes}")
        self.sources = dict(sources)
        self.split = split
        self.dims = dict(dims)
        self.max_bytes = max_bytes
        self.requests = 0

    def read(self, tables: Mapping[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{table: (values float32 [n, dim], found bool [n])}`` of ``tables``' keys, in
        their order; ``ReloadFailed`` naming the partition when a source fails."""
        out = {}
        per_part: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for table, keys in tables.items():
            keys = np.asarray(keys, dtype=np.int64)
            dim = self.dims[table]
            out[table] = (np.zeros((keys.shape[0], dim), np.float32), np.zeros(keys.shape[0], bool))
            parts = [(next(iter(self.sources)), np.arange(keys.shape[0]))]
            if self.split is not None:
                parts = self.split(table, keys)
            for p, where in parts:
                per_part.setdefault(p, {})[table] = (keys[where], where)
        for p, wanted in per_part.items():
            source = self.sources.get(p)
            if source is None:
                raise ReloadFailed(f"no source to read partition {p} from ({sorted(self.sources)})")
            for chunk in self._chunks(wanted):
                try:
                    answer = source.lookup_many({t: k for t, (k, _) in chunk.items()})
                except (ClientError, OSError) as exc:
                    raise ReloadFailed(f"partition {p}'s source: {exc}") from exc
                self.requests += 1
                for t, (_, where) in chunk.items():
                    _place(out[t], answer[t], where, self.dims[t])
        return out

    def _chunks(
        self, wanted: dict[str, tuple[np.ndarray, np.ndarray]]
    ) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
        """The lookups of one partition: tables' key ranges packed into answers of at most
        ``max_bytes`` (a row answers its version, found flag and values)."""
        chunks: list[dict] = [{}]
        room = self.max_bytes
        for table, (keys, where) in wanted.items():
            per_row = 9 + 4 * self.dims[table]
            start = 0
            while start < keys.shape[0]:
                n = room // per_row
                if n == 0:
                    chunks.append({})
                    room = self.max_bytes
                    continue
                end = min(keys.shape[0], start + n)
                chunks[-1][table] = (keys[start:end], where[start:end])
                room -= (end - start) * per_row
                start = end
        return [c for c in chunks if c]


def _place(
    into: tuple[np.ndarray, np.ndarray], rows: TableRows, where: np.ndarray, dim: int
) -> None:
    values, found = into
    got = np.asarray(rows.found, dtype=bool)
    if got.shape[0] != where.shape[0]:
        raise ReloadFailed(f"table {rows.table}: {got.shape[0]} rows for {where.shape[0]} keys")
    v = np.asarray(rows.values, dtype=np.float32).reshape(-1, dim) if got.any() else None
    if v is not None and v.shape[0] != got.shape[0]:
        # without known versions every row comes back, found or not
        raise ReloadFailed(f"table {rows.table}: {v.shape[0]} values for {got.shape[0]} rows")
    found[where] = got
    if v is not None:
        values[where[got]] = v[got]


@dataclass(frozen=True)
class QuarantineConfig:
    """How a rank waits out a failed reload: the first retry after ``retry_s``, doubling up
    to ``max_retry_s``; lookups of at most ``max_request_bytes`` of answer; ``clock`` the
    wall clock a quarantine's end is read by (seconds since the epoch; a picklable fake in
    tests: the ranks are spawned); ``max_quarantine_s``: the longest pause a refusal can
    impose from now (its headers are not signed: a later end is capped, and said)."""

    retry_s: float = 0.5
    max_retry_s: float = 30.0
    max_request_bytes: int = 8 << 20
    clock: Callable[[], float] = time.time
    max_quarantine_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.max_quarantine_s < 1e9:  # NaN and inf fail too
            raise ValueError(
                f"QuarantineConfig.max_quarantine_s: 0 < s < 1e9 expected, got "
                f"{self.max_quarantine_s}"
            )
        if not 0 < self.retry_s <= self.max_retry_s or not math.isfinite(self.max_retry_s):
            raise ValueError(
                f"QuarantineConfig: 0 < retry_s <= max_retry_s (finite) expected, got "
                f"retry_s={self.retry_s}, max_retry_s={self.max_retry_s}"
            )
        if self.max_request_bytes < 1024:
            raise ValueError(
                f"QuarantineConfig.max_request_bytes: >= 1024, got {self.max_request_bytes}"
            )


@dataclass(frozen=True)
class QuarantineStats:
    """A rank's rollbacks so far: the highest epoch and the latest end handled (-1, 0:
    none), the batches and events it dropped, reloads done and failed, rows the reloads
    changed."""

    epoch: int
    until: float
    paused: bool
    batches_dropped: int
    events_dropped: int
    reloads: int
    reload_failures: int
    rows_reloaded: int


@dataclass(frozen=True)
class Decision:
    """What every rank does with this step's batch (the same on every rank)."""

    train: bool
    entered: Quarantined | None  # a rollback every rank learned of this step
    resumed: bool  # the first trained step after a pause: dense broadcast, sinks resumed
    reload_due: bool  # the quarantine is over: reload if not done


MAX_EPOCH = 2**62
"""A refusal's epoch (and end in ms) is capped here: the ranks all-reduce it in int64."""


class QuarantineGate:
    """One rank's part of the agreement: what it saw (``saw``), what all agree (``agree``,
    a collective: every rank calls it once per step), and its counters.

    Why the sentinel -1 and a pair: epochs are >= 0; a rollback is new when its epoch or
    its end rises above the last one handled (a refusal of an older epoch, late or from a
    restarted coordinator, changes nothing unless its quarantine ends later)."""

    def __init__(self, rank: int, config: QuarantineConfig) -> None:
        self.rank = rank
        self.config = config
        self.clock = config.clock
        self.seen = (-1, 0)  # the highest (epoch, until_ms) this rank was refused with
        self.handled = (-1, 0)  # the agreed (epoch, until_ms) of the last rollback
        self.paused = False
        self.reloaded = True  # this rank reloaded for ``handled``
        self.next_try = 0.0
        self._backoff = config.retry_s
        self.batches_dropped = self.events_dropped = 0
        self.reloads = self.reload_failures = self.rows_reloaded = 0

    def saw(self, q: Quarantined) -> None:
        """A refusal this rank's sinks raised."""
        until_ms = int(min(q.until, MAX_EPOCH / 1000) * 1000)  # capped by ``agree`` too
        epoch = min(q.epoch, MAX_EPOCH)  # the agreement's tensor is int64
        if epoch < self.seen[0]:
            log.warning(
                "rank %d: refused as quarantined with epoch %d, below epoch %d seen before "
                "(a late answer, or a restarted coordinator): pausing by its end only",
                self.rank, epoch, self.seen[0],
            )  # fmt: skip
        self.seen = (max(self.seen[0], epoch), max(self.seen[1], until_ms))

    def agree(self) -> Decision:
        """One ``all_reduce(MAX)``; the decision every rank takes from its result."""
        now_ms = int(self.clock() * 1000)
        latest = now_ms + int(self.config.max_quarantine_s * 1000)
        if self.seen[1] > latest:
            log.error(
                "rank %d: refused as quarantined until %.3f, more than max_quarantine_s %.0f s "
                "from now: pausing until %.3f only (a spoofed or misconfigured answer?)",
                self.rank, self.seen[1] / 1000, self.config.max_quarantine_s, latest / 1000,
            )  # fmt: skip
            self.seen = (self.seen[0], latest)
        mine = [self.seen[0], self.seen[1], -now_ms, 0 if self.reloaded else 1]
        t = torch.tensor(mine, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        epoch, until_ms, neg_now, unloaded = t.tolist()
        self.seen = (max(self.seen[0], epoch), max(self.seen[1], until_ms))
        entered = None
        if epoch > self.handled[0] or until_ms > self.handled[1]:
            self.handled = (max(epoch, self.handled[0]), max(until_ms, self.handled[1]))
            self.paused, self.reloaded = True, False
            self.next_try, self._backoff = 0.0, self.config.retry_s
            e, u = self.handled[0], self.handled[1] / 1000
            entered = Quarantined(e, u, f"rollback epoch {e}: writes refused until {u:.3f}")
            log.warning(
                "rank %d: the model was rolled back (epoch %d); dropping batches until "
                "%.3f, then reloading the restored rows", self.rank, e, u,
            )  # fmt: skip
        over = -neg_now >= self.handled[1]
        if not self.paused:
            return Decision(True, None, False, False)
        if entered is None and over and unloaded == 0:
            self.paused = False
            return Decision(True, None, True, False)
        return Decision(False, entered, False, over)

    def dropped(self, events: int) -> None:
        self.batches_dropped += 1
        self.events_dropped += events

    def try_now(self) -> bool:
        """Whether a reload may be tried now (not before the backoff's next try)."""
        return not self.reloaded and self.clock() >= self.next_try

    def reload_done(self, rows: int) -> None:
        self.reloaded = True
        self.reloads += 1
        self.rows_reloaded += rows
        log.warning(
            "rank %d: reloaded after rollback epoch %d: %d rows changed",
            self.rank, self.handled[0], rows,
        )  # fmt: skip

    def reload_failed(self, error: BaseException) -> None:
        self.reload_failures += 1
        wait = self._backoff
        self.next_try = self.clock() + wait
        self._backoff = min(self._backoff * 2, self.config.max_retry_s)
        log.warning(
            "rank %d: reload after rollback epoch %d failed (%s); every rank keeps dropping "
            "its batches, retrying in %.1f s", self.rank, self.handled[0], error, wait,
        )  # fmt: skip

    def statistics(self) -> QuarantineStats:
        return QuarantineStats(
            epoch=self.handled[0],
            until=self.handled[1] / 1000,
            paused=self.paused,
            batches_dropped=self.batches_dropped,
            events_dropped=self.events_dropped,
            reloads=self.reloads,
            reload_failures=self.reload_failures,
            rows_reloaded=self.rows_reloaded,
        )


def reader_for(sink: object, dims: Mapping[str, int], max_bytes: int) -> SourceReader | None:
    """The reader of what ``sink`` wrote: a ``PartitionRouter``'s partitions' sources (each
    sink's ``client``, or the sink itself when it can ``lookup_many``), or one sink's; None
    when it cannot be read back (a reload then fails, saying so)."""
    parts = getattr(sink, "sinks", None)
    split = getattr(sink, "split", None)
    if not isinstance(parts, Mapping):
        parts, split = {0: sink}, None
    sources = {p: getattr(s, "client", s) for p, s in parts.items()}
    if not sources or not all(callable(getattr(s, "lookup_many", None)) for s in sources.values()):
        return None
    return SourceReader(sources, split, dims, max_bytes)
