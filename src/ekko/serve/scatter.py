"""Scatter-gather row lookups: one predict batch's rows from the holders of each partition.

A partitioned cluster (issue 17) spreads each table's shards over partitions
(``ekko.store.placement``), each held by one or more nodes of a DC. A serving node reads a
batch's rows by asking, in parallel, one holder of every partition the batch touches for all
of that partition's keys of every table, in one binary request (``POST /v1/lookup``), under
one deadline for the batch. A holder slower than its partition's observed p95 is hedged (the
same request goes to the next holder, the first answer wins), a holder that fails is retried
on the next one at once, and a partition none of whose holders answers is a
``PartitionUnavailable`` (HTTP 503) naming it, the tables asked and every holder tried.

Why no I/O here: the node owns how to reach its peers (URLs, TLS, credentials), tests own
time; this module gets a ``Fetch`` (``ekko.serve.scatter_http.HttpHolders`` over HTTP, fakes
in tests) and reads time from the running event loop, so a test runs it on a loop with
virtual time. No row cache: every row is read from a holder, so a served row is never older
than the holder's (the issue allows a cache only if the sync stream invalidates it).
"""

from __future__ import annotations

import asyncio
import bisect
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ekko.client.wire import TableRows
from ekko.net.httpkit import RequestError
from ekko.serve.errors import ModelNotReady
from ekko.serve.scatter_batch import Coalescer
from ekko.store import group_by_shard, shard_of
from ekko.store.placement import Placement


class HolderFailed(Exception):
    """One holder did not answer a lookup usefully: unreachable, an error status (``status``)
    or an answer that does not fit the request. Raised by a ``Fetch``."""

    def __init__(self, holder: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{holder}: {reason}")
        self.holder = holder
        self.reason = reason
        self.status = status

    @property
    def retriable(self) -> bool:
        """Whether another holder may answer: the network, a holder not ready or not holding
        the table yet (5xx, 404, 401/403 after its restart, 408, 429). A 400, 413 or 415 is
        our request's fault and every holder would refuse it."""
        return self.status is None or self.status >= 500 or self.status in (401, 403, 404, 408, 429)


class PartitionUnavailable(ModelNotReady):
    """No holder of a partition answered within the deadline: HTTP 503 naming the partition,
    the tables asked of it and what each holder tried did."""

    def __init__(self, partition: int, tables: Sequence[str], tried: Sequence[tuple[str, str]]):
        self.partition = partition
        self.tables = list(tables)
        self.tried = list(tried)
        shown = ", ".join(self.tables[:6]) + (" ..." if len(self.tables) > 6 else "")
        holders = "; ".join(f"{h}: {why}" for h, why in self.tried) or "none configured"
        super().__init__(
            f"partition {partition} has no live holder (tables {shown}); holders tried: {holders}"
        )


class LookupRefused(RequestError):
    """A holder refused the lookup as sent (400, 413, 415): every holder would, so it is not
    retried; HTTP 502 naming the holder and its reason."""

    def __init__(self, partition: int, failure: HolderFailed) -> None:
        super().__init__(
            f"partition {partition}: holder {failure.holder} refused the lookup: {failure.reason}",
            status=502,
        )


class Fetch(Protocol):
    """Looks up rows at one holder: ``tables`` maps a table to its keys int64 [n],
    ``known`` (a subset of the tables) to the versions held already (rows still at them come
    back without values, ``TableRows``); the answer maps every table asked, in order. Raises
    ``HolderFailed`` for anything but an answer."""

    async def __call__(
        self, holder: str, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray]
    ) -> Mapping[str, TableRows]: ...


@dataclass(frozen=True)
class ScatterConfig:
    """How a batch is scattered: ``deadline_s`` for the whole batch; a partition's request is
    hedged after its p95 (``quantile``) over its last ``window`` answers, never sooner than
    ``hedge_min_s``, and after ``hedge_initial_s`` until ``min_samples`` answers were seen;
    a holder that failed, or was still silent when another answered, is tried last for
    ``suspect_s`` (a stalled holder never fails: asked first by every batch, it made each
    answer wait the hedge delay, and the p95 of those answers pushed the delay up to the
    deadline). ``coalesce``: lookups arriving
    while a scatter is in flight are merged, at most that many, into the next one
    (``ekko.serve.scatter_batch``); 0 sends each lookup on its own."""

    deadline_s: float = 1.0
    hedge_initial_s: float = 0.05
    hedge_min_s: float = 0.001
    quantile: float = 0.95
    window: int = 256
    min_samples: int = 20
    suspect_s: float = 2.0
    coalesce: int = 16

    def __post_init__(self) -> None:
        for name in ("deadline_s", "hedge_initial_s", "hedge_min_s", "suspect_s"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        if self.deadline_s <= 0:
            raise ValueError(f"deadline_s: expected > 0, got {self.deadline_s!r}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"quantile: expected in (0, 1], got {self.quantile!r}")
        if (
            isinstance(self.coalesce, bool)
            or not isinstance(self.coalesce, int)
            or not (0 <= self.coalesce <= 1024)
        ):
            raise ValueError(f"coalesce: expected an integer in [0, 1024], got {self.coalesce!r}")
        if self.window < 1 or self.min_samples < 1 or self.min_samples > self.window:
            raise ValueError(
                f"window and min_samples: expected 1 <= min_samples <= window, got "
                f"window={self.window!r} min_samples={self.min_samples!r}"
            )


class LatencyWindow:
    """The last ``size`` answer times of one partition and their quantile (the hedge delay).

    Why the time to the partition's answer (hedged or not) rather than each request's: a
    request that lost to its hedge never reports its own time, and the answers alone would
    drift the quantile down to the hedges' times. Kept sorted as well as in arrival order:
    every batch adds a sample and reads the quantile, and ``np.quantile`` of the window each
    time cost a serving node more CPU than the rest of the scatter's bookkeeping.
    """

    def __init__(self, size: int, quantile: float) -> None:
        self._samples: deque[float] = deque()
        self._sorted: list[float] = []
        self.size = size
        self.quantile = quantile

    def add(self, seconds: float) -> None:
        if len(self._samples) == self.size:
            del self._sorted[bisect.bisect_left(self._sorted, self._samples.popleft())]
        self._samples.append(seconds)
        bisect.insort(self._sorted, seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def value(self) -> float:
        """The quantile of the samples, interpolated linearly as ``np.quantile`` does (0
        with none)."""
        s = self._sorted
        if not s:
            return 0.0
        pos = self.quantile * (len(s) - 1)
        lo = int(pos)
        if lo + 1 >= len(s):
            return s[lo]
        return s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class PartitionStats:
    """Counters of one partition's lookups: batches asked, answered, hedges and retries
    sent, batches no holder answered, and the current hedge delay."""

    partition: int
    requests: int
    answered: int
    hedges: int
    retries: int
    unavailable: int
    hedge_after_s: float


class _Counters:
    def __init__(self) -> None:
        self.requests = self.answered = self.hedges = self.retries = self.unavailable = 0


class PartitionedLookup:
    """Reads rows of any table from the holders of the partitions that hold their keys.

    Why one object per serving node: the per-partition latency windows (the hedge delays)
    and the holders that failed lately are shared by every batch it serves.

    Args:
        placement: which partition holds each (table, shard).
        holders: partition -> its holders, in order of preference (base URLs for
            ``HttpHolders``); every partition of ``placement`` needs one.
        fetch: how one holder is asked.
        num_shards: a table's shard count (the node's catalog, or the holders' listing).
        config: deadline and hedging.
    """

    def __init__(
        self,
        placement: Placement,
        holders: Mapping[int, Sequence[str]],
        fetch: Fetch,
        num_shards: Callable[[str], int],
        config: ScatterConfig | None = None,
    ) -> None:
        missing = [p for p in range(placement.partitions) if not holders.get(p)]
        if missing:
            raise ValueError(f"holders: partitions {missing} have no holder")
        extra = sorted(set(holders) - set(range(placement.partitions)))
        if extra:
            raise ValueError(f"holders: partitions {extra} are not in [0, {placement.partitions})")
        self.placement = placement
        self.holders = {p: list(holders[p]) for p in range(placement.partitions)}
        self.fetch = fetch
        self.num_shards = num_shards
        self.config = config or ScatterConfig()
        cfg = self.config
        self._windows = [LatencyWindow(cfg.window, cfg.quantile) for _ in self.holders]
        self._counters = [_Counters() for _ in self.holders]
        self._suspect: dict[str, float] = {}  # holder -> loop time until which it goes last
        self._shard_parts_of: dict[tuple[str, int], np.ndarray] = {}  # each shard's partition
        self.coalescer = Coalescer(self._scatter, cfg.coalesce) if cfg.coalesce else None

    # -- grouping --------------------------------------------------------------------------

    def _shard_parts(self, table: str) -> tuple[int, np.ndarray]:
        """The table's shard count and each shard's partition."""
        n = self.num_shards(table)
        of = self._shard_parts_of.get((table, n))
        if of is None:
            of = self._shard_parts_of[table, n] = self.placement.partitions_of(table, n)
        return n, of

    def partition_of_keys(self, table: str, keys: np.ndarray) -> np.ndarray:
        """int64 [n]: the partition holding each key of ``table``."""
        if self.placement.partitions == 1:
            return np.zeros(keys.shape[0], dtype=np.int64)
        n, of = self._shard_parts(table)
        return of[shard_of(keys, n)]

    def _split(self, table: str, keys: np.ndarray) -> list[tuple[int, np.ndarray | None]]:
        """(partition, positions of its keys in ``keys``; None: all of them) for each
        partition holding some of ``table``'s ``keys``, in partition order."""
        if self.placement.partitions == 1:
            return [(0, None)]
        if keys.shape[0] == 1:
            return [(int(self.partition_of_keys(table, keys)[0]), None)]
        _, of = self._shard_parts(table)
        order, counts = group_by_shard(keys, of, self.placement.partitions)
        out: list[tuple[int, np.ndarray | None]] = []
        end = 0
        for p, c in enumerate(counts.tolist()):
            if c:
                out.append((p, order[end : end + c]))
                end += c
        if len(out) == 1:
            return [(out[0][0], None)]
        return out

    def hedge_after(self, partition: int) -> float:
        """Seconds a request to ``partition`` waits before it is hedged."""
        cfg = self.config
        w = self._windows[partition]
        if len(w) < cfg.min_samples:
            return cfg.hedge_initial_s
        return max(cfg.hedge_min_s, w.value())

    # -- lookup ----------------------------------------------------------------------------

    async def lookup(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, TableRows]:
        """Rows of every table's keys (int64 [n]) from the partitions holding them, each
        ``TableRows`` in the keys' order; ``known`` versions (int64 [n] of a table) leave rows
        still at them out of ``values``, as one holder's ``POST /v1/lookup`` does.

        Raises ``PartitionUnavailable`` when a partition's holders all failed or the deadline
        passed, ``LookupRefused`` when a holder refused the request itself."""
        known = known or {}
        asked: dict[str, np.ndarray] = {}
        for table, keys in tables.items():
            k = np.ascontiguousarray(keys, dtype=np.int64)
            if k.ndim != 1 or k.shape[0] == 0:
                raise ValueError(f"tables[{table!r}]: expected int64 keys [n >= 1], got {k.shape}")
            asked[table] = k
        deadline = asyncio.get_running_loop().time() + self.config.deadline_s
        if self.coalescer is not None:
            return dict(await self.coalescer.lookup(asked, known, deadline))
        return await self._scatter(asked, known, deadline)

    async def _scatter(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray], deadline: float
    ) -> dict[str, TableRows]:
        """One scatter of ``tables`` (validated int64 keys) to the partitions holding them."""
        parts: dict[int, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        where: dict[str, list[tuple[int, np.ndarray | None]]] = {}
        for table, k in tables.items():
            v = known.get(table)
            where[table] = self._split(table, k)
            for p, idx in where[table]:
                sub_t, sub_k = parts.setdefault(p, ({}, {}))
                sub_t[table] = k if idx is None else k[idx]
                if v is not None:
                    sub_k[table] = v if idx is None else v[idx]
        tasks = {
            p: asyncio.ensure_future(self._ask(p, t, k, deadline)) for p, (t, k) in parts.items()
        }
        try:
            answers = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
        finally:
            _drop(tasks.values())
        return {
            table: _merge(table, tables[table], known.get(table), where[table], answers)
            for table in tables
        }

    def _order(self, partition: int, now: float) -> list[str]:
        """The partition's holders, those that failed lately last."""
        hs = self.holders[partition]
        ok = [h for h in hs if self._suspect.get(h, -math.inf) <= now]
        return ok + [h for h in hs if h not in ok]

    async def _ask(
        self,
        p: int,
        tables: dict[str, np.ndarray],
        known: dict[str, np.ndarray],
        deadline: float,
    ) -> Mapping[str, TableRows]:
        """One partition's rows: hedged after its p95, retried on error, until the deadline."""
        loop = asyncio.get_running_loop()
        counters = self._counters[p]
        counters.requests += 1
        start = loop.time()
        order = self._order(p, start)
        hedge_after = self.hedge_after(p)
        running: dict[asyncio.Future, str] = {}
        tried: list[tuple[str, str]] = []
        sent = 0
        next_hedge = math.inf

        def launch() -> None:
            nonlocal sent, next_hedge
            holder = order[sent]
            sent += 1
            running[asyncio.ensure_future(self.fetch(holder, tables, known))] = holder
            next_hedge = loop.time() + hedge_after if sent < len(order) else math.inf

        launch()
        try:
            while running:
                now = loop.time()
                if now >= deadline:
                    break
                done, _ = await asyncio.wait(
                    running, timeout=min(deadline, next_hedge) - now,
                    return_when=asyncio.FIRST_COMPLETED,
                )  # fmt: skip
                if not done:
                    if loop.time() >= next_hedge:
                        counters.hedges += 1
                        launch()
                    continue
                for task in done:
                    holder = running.pop(task)
                    exc = task.exception()
                    if exc is None:
                        try:
                            answer = _checked(holder, tables, known, task.result())
                        except HolderFailed as bad:
                            exc = bad
                        else:
                            now = loop.time()
                            self._windows[p].add(now - start)
                            self._suspect.pop(holder, None)
                            for slower in running.values():  # lost to a hedge or a retry
                                self._suspect[slower] = now + self.config.suspect_s
                            counters.answered += 1
                            return answer
                    if not isinstance(exc, HolderFailed):
                        raise exc
                    if not exc.retriable:
                        raise LookupRefused(p, exc) from exc
                    tried.append((holder, exc.reason))
                    self._suspect[holder] = loop.time() + self.config.suspect_s
                if sent < len(order):
                    counters.retries += 1
                    launch()
        finally:
            _drop(running)
        tried += [(h, f"no answer within the deadline ({self.config.deadline_s:g} s)")
                  for h in running.values()]  # fmt: skip
        counters.unavailable += 1
        raise PartitionUnavailable(p, list(tables), tried)

    async def close(self) -> None:
        """Cancel the merged lookups in flight, then close the fetch's connections
        (``HttpHolders``' streams), if it keeps any."""
        if self.coalescer is not None:
            await self.coalescer.close()
        close = getattr(self.fetch, "close", None)
        if close is not None:
            await close()

    def coalesced(self) -> tuple[int, int]:
        """(scatters sent, lookups that went out merged with others): (0, 0) when
        ``coalesce`` is 0."""
        c = self.coalescer
        return (0, 0) if c is None else (c.scatters, c.merged)

    def statistics(self) -> list[PartitionStats]:
        return [
            PartitionStats(
                p, c.requests, c.answered, c.hedges, c.retries, c.unavailable, self.hedge_after(p)
            )
            for p, c in enumerate(self._counters)
        ]


def _drop(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel the tasks still running; read the outcome of those done (a lost hedge's error
    is no "exception never retrieved")."""
    for task in tasks:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()


def _checked(
    holder: str,
    tables: Mapping[str, np.ndarray],
    known: Mapping[str, np.ndarray],
    answer: Mapping[str, TableRows],
) -> Mapping[str, TableRows]:
    """``answer`` if it answers every table asked with arrays of the request's shape, else
    ``HolderFailed`` (the holder is tried as a failed one)."""
    for table, keys in tables.items():
        rows = answer.get(table)
        if rows is None:
            raise HolderFailed(holder, f"the answer lacks table {table!r}")
        n = keys.shape[0]
        if rows.versions.shape != (n,) or rows.found.shape != (n,) or rows.values.ndim != 2:
            raise HolderFailed(holder, f"table {table!r}: the answer's arrays do not fit {n} keys")
        v = known.get(table)
        m = n if v is None else int(np.count_nonzero(rows.versions != v))
        if rows.values.shape[0] != m:
            raise HolderFailed(
                holder, f"table {table!r}: {rows.values.shape[0]} rows of values, expected {m}"
            )
    return answer


def _merge(
    table: str,
    keys: np.ndarray,
    known: np.ndarray | None,
    where: list[tuple[int, np.ndarray | None]],
    answers: Mapping[int, Mapping[str, TableRows]],
) -> TableRows:
    """One table's ``TableRows`` over all its keys from the partitions' answers."""
    if len(where) == 1 and where[0][1] is None:
        return answers[where[0][0]][table]
    n = keys.shape[0]
    dims = {answers[p][table].values.shape[1] for p, _ in where}
    if len(dims) > 1:
        raise ModelNotReady(f"table {table!r}: its partitions answer rows of dims {sorted(dims)}")
    dim = dims.pop()
    versions = np.empty(n, dtype=np.int64)
    found = np.empty(n, dtype=np.uint8)
    for p, idx in where:
        rows = answers[p][table]
        versions[idx] = rows.versions
        found[idx] = rows.found
    if known is None:  # every row came with its values
        values = np.empty((n, dim), dtype=np.float32)
        for p, idx in where:
            values[idx] = answers[p][table].values
        return TableRows(table, versions, found, values)
    changed = versions != known
    rank = np.cumsum(changed) - 1
    values = np.empty((int(rank[-1]) + 1 if n else 0, dim), dtype=np.float32)
    for p, idx in where:
        rows = answers[p][table]
        values[rank[idx[changed[idx]]]] = rows.values
    return TableRows(table, versions, found, values)
