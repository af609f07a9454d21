"""Lookups that arrive while a scatter is in flight go out together in the next one.

Every scatter costs each partition holder a frame to read, a lookup per table and an answer
to send, whatever the number of keys, and costs the serving node a request per partition.
Under concurrent predicts those fixed costs, paid once per predict per partition, are what
makes a 4-partition batch dearer than a 1-partition one. So a serving node keeps one scatter
in flight: lookups that arrive meanwhile wait for it to finish and are then sent as one
merged lookup (their keys concatenated per table), whose answer is cut back into each
caller's. A lone lookup goes out at once, so light load pays nothing for it (the same
opportunistic batching as Nagle's algorithm, or a serving system's dynamic batching with no
wait).

Why each queued caller keeps a timer of its own: it waits for the scatter in flight and then
for its own merged one, and the scatter in flight answers to its own deadline, not to the
callers queued behind it. A caller gives up at its deadline with the error its own scatter
would have raised then (``expired``; ``PartitionedLookup``'s names the partition the scatter
in flight still waits on: HTTP 503), and is dropped from the queue, or from its batch's
answer. So a merged scatter runs to the LATEST deadline of its batch: with the earliest, a
caller that queued later (a later deadline) would fail at an earlier caller's.

Why per-caller ``known`` versions stay exact: the merged request carries each caller's
versions for its own keys and ``NO_VERSION`` for callers without, so every caller gets back
exactly the values its own request would have had.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ekko.client.wire import TableRows
from ekko.net.httpkit import RequestError
from ekko.serve.errors import ModelNotReady

log = logging.getLogger(__name__)

NO_VERSION = -1  # a known version no row has (versions are >= 0): its values always come back

Scatter = Callable[
    [Mapping[str, np.ndarray], Mapping[str, np.ndarray], float],
    Awaitable[Mapping[str, TableRows]],
]
Expired = Callable[[Mapping[str, np.ndarray]], Exception]
"""The error a caller that queued with ``tables`` raises when its deadline passed first."""


@dataclass
class _Waiting:
    tables: Mapping[str, np.ndarray]
    known: Mapping[str, np.ndarray]
    deadline: float
    future: asyncio.Future = field(repr=False)


class Coalescer:
    """Runs ``scatter(tables, known, deadline)`` with at most one call in flight, merging the
    lookups that queued behind it (at most ``max_batch`` into one); a queued lookup whose
    deadline (loop time) passes first raises ``expired(tables)``.

    Why a separate object: the merge and the cut are pure array work, testable without
    holders; ``PartitionedLookup`` keeps the hedging and retries of each scatter.
    """

    def __init__(self, scatter: Scatter, max_batch: int = 16, *, expired: Expired) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: expected >= 1, got {max_batch!r}")
        self.scatter = scatter
        self.max_batch = max_batch
        self.expired = expired
        self._busy = False
        self._queue: list[_Waiting] = []
        self._tasks: set[asyncio.Task] = set()
        self.merged = 0  # lookups that went out in a merged scatter
        self.scatters = 0  # scatters sent
        self.gave_up = 0  # queued lookups whose deadline passed first

    async def lookup(
        self, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray], deadline: float
    ) -> Mapping[str, TableRows]:
        loop = asyncio.get_running_loop()
        if self._busy:
            waiting = _Waiting(tables, known, deadline, loop.create_future())
            self._queue.append(waiting)
            timer = asyncio.timeout_at(deadline)
            try:
                async with timer:  # on expiry, cancels the future: the caller is dropped
                    return await waiting.future
            except TimeoutError as late:
                if not timer.expired():
                    raise  # the scatter's own error
                self.gave_up += 1
                raise self.expired(tables) from late
        self._busy = True
        self.scatters += 1
        try:
            return await self.scatter(tables, known, deadline)
        finally:
            self._next()

    def _next(self) -> None:
        """Send what queued meanwhile (callers that gave up are dropped), or go idle."""
        self._queue = [w for w in self._queue if not w.future.done()]
        if not self._queue:
            self._busy = False
            return
        batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        self.scatters += 1
        self.merged += len(batch) if len(batch) > 1 else 0
        try:
            if len(batch) == 1:
                answers = [await self.scatter(batch[0].tables, batch[0].known, batch[0].deadline)]
            else:
                tables, known, cuts = merge(batch)
                # the latest: each caller gives up at its own deadline (its timer in lookup)
                got = await self.scatter(tables, known, max(w.deadline for w in batch))
                answers = cut(got, known, cuts)
        except BaseException as exc:  # every caller of the batch hears how it ended
            if isinstance(exc, Exception) and not isinstance(exc, ModelNotReady | RequestError):
                log.exception("merged scatter of %d lookups failed", len(batch))  # a bug: said
            for w in batch:
                if not w.future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        w.future.cancel()
                    else:
                        w.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        else:
            for w, answer in zip(batch, answers, strict=True):
                if not w.future.done():
                    w.future.set_result(answer)
        finally:
            self._next()

    async def close(self) -> None:
        """Cancel the batches in flight (their callers see the cancellation)."""
        for task in list(self._tasks):
            task.cancel()
        for w in self._queue:
            w.future.cancel()
        self._queue = []
        await asyncio.gather(*self._tasks, return_exceptions=True)


Cuts = list[dict[str, tuple[int, int]]]  # per caller: table -> (start, stop) in the merged keys


def merge(batch: list[_Waiting]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Cuts]:
    """One lookup asking every caller's keys of every table, and where each caller's are."""
    keys: dict[str, list[np.ndarray]] = {}
    versions: dict[str, list[np.ndarray]] = {}
    sizes: dict[str, int] = {}
    cuts: Cuts = []
    for w in batch:
        mine = {}
        for table, k in w.tables.items():
            at = sizes.get(table, 0)
            mine[table] = (at, at + k.shape[0])
            sizes[table] = at + k.shape[0]
            keys.setdefault(table, []).append(k)
            v = w.known.get(table)
            versions.setdefault(table, []).append(
                np.full(k.shape[0], NO_VERSION, dtype=np.int64) if v is None else v
            )
        cuts.append(mine)
    tables = {t: np.concatenate(ks) for t, ks in keys.items()}
    known = {
        t: np.concatenate(vs)
        for t, vs in versions.items()
        if any(w.known.get(t) is not None for w in batch)
    }
    return tables, known, cuts


def cut(
    got: Mapping[str, TableRows], known: Mapping[str, np.ndarray], cuts: Cuts
) -> list[dict[str, TableRows]]:
    """Each caller's answer out of the merged one: its keys' versions and found flags, and
    the values of those of its rows the merged answer carried."""
    starts: dict[str, np.ndarray] = {}  # table -> index of each key's values row
    for table, rows in got.items():
        v = known.get(table)
        if v is not None:
            starts[table] = np.concatenate(([0], np.cumsum(rows.versions != v)))
    out = []
    for mine in cuts:
        answer = {}
        for table, (a, b) in mine.items():
            rows = got[table]
            at = starts.get(table)
            lo, hi = (a, b) if at is None else (int(at[a]), int(at[b]))
            answer[table] = TableRows(
                table, rows.versions[a:b], rows.found[a:b], rows.values[lo:hi]
            )
        out.append(answer)
    return out
