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
by partition, answers merged back in one kernel call), ``scatter_ask`` (one partition's
holders asked, hedged and retried, by callbacks), ``scatter_policy`` (the config, hedge
delays, the order holders are asked in, counters), ``scatter_batch`` (lookups queued behind
a scatter in flight merged into the next). This module splits, gathers and merges.

Why no I/O here: the node owns how to reach its peers (URLs, TLS, credentials), tests own
time; this module gets a ``Fetch`` (``ekko.serve.scatter_http.HttpHolders`` over HTTP, fakes
in tests) and reads time from the running event loop, so a test runs it on a loop with
virtual time. No row cache: every row is read from a holder, so a served row is never older
than the holder's (the issue allows a cache only if the sync stream invalidates it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ekko.client.wire import TableRows
from ekko.serve.scatter_ask import PartitionAsk
from ekko.serve.scatter_batch import Coalescer
from ekko.serve.scatter_fetch import Fetch, PartitionUnavailable
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
        self.asking = [0] * placement.partitions  # scatters waiting on each partition now
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
        asks = [PartitionAsk(self, p, ask, deadline) for p, ask in split.asks.items()]
        try:
            answers = await asyncio.gather(*(a.future for a in asks))
        finally:
            for a in asks:
                a.future.cancel()  # the others, when one failed (or this was cancelled)
        return merge(split, dict(zip(split.asks, answers, strict=True)))

    def _expired(self, tables: Mapping[str, np.ndarray]) -> PartitionUnavailable:
        """What a lookup queued behind a scatter in flight raises at its deadline: the 503 of
        a scatter past its deadline, naming the partition that scatter still waits on (one
        of the lookup's own if it can), as the scatter will when its own deadline passes."""
        held = self.keys.held_by(tables)
        mine = list(held)
        slow = [p for p in mine if self.asking[p]]
        slow = slow or [p for p, n in enumerate(self.asking) if n] or mine
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
