"""Scatter-gather row lookups: one predict batch's rows from the holders of each partition.

A partitioned cluster (issue 17) spreads each table's shards over partitions
(``ekko.store.placement``), each held by one or more nodes of a DC. A serving node reads a
batch's rows by asking, in parallel, one holder of every partition the batch touches for all
of that partition's keys of every table, in one binary request (``POST /v1/lookup``), under
one deadline for the batch. A holder slower than its partition's observed p95 is hedged (the
same request goes to the next holder, the first answer wins), a holder that fails is retried
on the next one at once, and a partition none of whose holders answers is a
``PartitionUnavailable`` (HTTP 503) naming it, the tables asked and every holder tried.

The parts: ``scatter_fetch`` (how one holder is asked and how that fails: one ``FlatAsk``
of every table's keys per partition, one ``FlatRows`` back), ``scatter_keys`` (keys split
by partition, answers merged back in one kernel call), ``scatter_policy`` (the config, hedge delays,
the order holders are asked in, counters), ``scatter_batch`` (lookups queued behind a
scatter in flight merged into the next). This module asks and waits.

Why no I/O here: the node owns how to reach its peers (URLs, TLS, credentials), tests own
time; this module gets a ``Fetch`` (``ekko.serve.scatter_http.HttpHolders`` over HTTP, fakes
in tests) and reads time from the running event loop, so a test runs it on a loop with
virtual time. No row cache: every row is read from a holder, so a served row is never older
than the holder's (the issue allows a cache only if the sync stream invalidates it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from ekko.client.wire import TableRows
from ekko.serve.scatter_batch import Coalescer
from ekko.serve.scatter_fetch import (
    Fetch,
    FlatAsk,
    FlatRows,
    HolderFailed,
    LookupRefused,
    PartitionUnavailable,
    checked,
)
from ekko.serve.scatter_keys import PartitionKeys, merge
from ekko.serve.scatter_policy import HolderPolicy, PartitionStats, ScatterConfig
from ekko.store.placement import Placement


class PartitionedLookup:
    """Reads rows of any table from the holders of the partitions that hold their keys.

    Why one object per serving node: the per-partition latency windows (the hedge delays)
    and the holders that failed lately (``policy``) are shared by every batch it serves.

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
        self.config = cfg = config or ScatterConfig()
        self.keys = PartitionKeys(placement, num_shards)
        self.policy = HolderPolicy(self.holders, cfg)
        self._asking = [0] * placement.partitions  # scatters waiting on each partition now
        self.coalescer = (
            Coalescer(self._scatter, cfg.coalesce, expired=self._expired) if cfg.coalesce else None
        )

    async def lookup(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, TableRows]:
        """Rows of every table's keys (int64 [n]) from the partitions holding them, each
        ``TableRows`` in the keys' order; ``known`` versions (int64 [n] of a table) leave rows
        still at them out of ``values``, as one holder's ``POST /v1/lookup`` does.

        Raises ``PartitionUnavailable`` when a partition's holders all failed or the deadline
        passed (also while queued behind a scatter in flight), ``LookupRefused`` when a
        holder refused the request itself."""
        known = known or {}
        asked: dict[str, np.ndarray] = {}
        for table, keys in tables.items():
            k = np.ascontiguousarray(keys, dtype=np.int64)
            if k.ndim != 1 or k.shape[0] == 0:
                raise ValueError(f"tables[{table!r}]: expected int64 keys [n >= 1], got {k.shape}")
            asked[table] = k
            v = known.get(table)
            if v is not None and np.shape(v) != k.shape:
                raise ValueError(
                    f"known[{table!r}]: expected {k.shape[0]} versions, one per key, got "
                    f"shape {np.shape(v)}"
                )
        deadline = asyncio.get_running_loop().time() + self.config.deadline_s
        if self.coalescer is not None:
            return dict(await self.coalescer.lookup(asked, known, deadline))
        return await self._scatter(asked, known, deadline)

    async def _scatter(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray], deadline: float
    ) -> dict[str, TableRows]:
        """One scatter of ``tables`` (validated int64 keys) to the partitions holding them."""
        if not tables:
            return {}
        split = self.keys.split(tables, known)
        tasks = {
            p: asyncio.ensure_future(self._ask(p, ask, deadline)) for p, ask in split.asks.items()
        }
        try:
            answers = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
        finally:
            _drop(tasks.values())
        return merge(split, answers)

    async def _ask(self, p: int, ask: FlatAsk, deadline: float) -> FlatRows:
        """One partition's rows: hedged after its p95, retried on error, until the deadline."""
        self._asking[p] += 1
        try:
            return await self._ask_holders(p, ask, deadline)
        finally:
            self._asking[p] -= 1

    async def _ask_holders(self, p: int, ask: FlatAsk, deadline: float) -> FlatRows:
        loop = asyncio.get_running_loop()
        policy = self.policy
        counters = policy.counters[p]
        counters.requests += 1
        start = loop.time()
        order = policy.order(p, start)
        hedge_after = policy.hedge_after(p)
        running: dict[asyncio.Future, str] = {}
        tried: list[tuple[str, str]] = []
        sent = 0
        next_hedge = math.inf

        def launch() -> None:
            nonlocal sent, next_hedge
            holder = order[sent]
            sent += 1
            running[asyncio.ensure_future(self.fetch.lookup(holder, ask))] = holder
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
                            answer = checked(holder, ask, task.result())
                        except HolderFailed as bad:
                            exc = bad
                        else:
                            now = loop.time()
                            policy.answered(p, holder, now - start, running.values(), now)
                            return answer
                    if not isinstance(exc, HolderFailed):
                        raise exc
                    if not exc.retriable:
                        raise LookupRefused(p, exc) from exc
                    tried.append((holder, exc.reason))
                    policy.failed(holder, loop.time())
                if sent < len(order):
                    counters.retries += 1
                    launch()
        finally:
            _drop(running)
        tried += [(h, f"no answer within the deadline ({self.config.deadline_s:g} s)")
                  for h in running.values()]  # fmt: skip
        counters.unavailable += 1
        raise PartitionUnavailable(p, ask.names, tried)

    def _expired(self, tables: Mapping[str, np.ndarray]) -> PartitionUnavailable:
        """What a lookup queued behind a scatter in flight raises at its deadline: the 503 of
        a scatter past its deadline, naming the partition that scatter still waits on (one
        of the lookup's own if it can), as the scatter will when its own deadline passes."""
        held = self.keys.held_by(tables)
        mine = list(held)
        slow = [p for p in mine if self._asking[p]]
        slow = slow or [p for p, n in enumerate(self._asking) if n] or mine
        p = slow[0]
        asked = held.get(p, [])
        why = (
            f"no answer within the deadline ({self.config.deadline_s:g} s) to the scatter "
            "this lookup waited for"
        )
        return PartitionUnavailable(p, asked or list(tables), [(h, why) for h in self.holders[p]])

    async def close(self) -> None:
        """Cancel the merged lookups in flight, then close the fetch's connections
        (``HttpHolders``' streams), if it keeps any."""
        if self.coalescer is not None:
            await self.coalescer.close()
        close = getattr(self.fetch, "close", None)
        if close is not None:
            await close()

    def coalesced(self) -> tuple[int, int, int]:
        """(scatters sent, lookups that went out merged with others, queued lookups whose
        deadline passed before their scatter answered): zeros when ``coalesce`` is 0."""
        c = self.coalescer
        return (0, 0, 0) if c is None else (c.scatters, c.merged, c.gave_up)

    def statistics(self) -> list[PartitionStats]:
        return self.policy.statistics()


def _drop(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel the tasks still running; read the outcome of those done (a lost hedge's error
    is no "exception never retrieved")."""
    for task in tasks:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()
