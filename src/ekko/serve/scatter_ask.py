"""One partition's part of a scatter: its holders asked, hedged, retried, until the deadline.

Why callbacks and not a coroutine per partition: a predict batch over 4 partitions paid,
per partition, a task to run the asking coroutine and an ``asyncio.wait`` (a future, a
callback on every request in flight, a timer) each time it waited, on top of the request
itself: tens of microseconds of the serving node's CPU per partition and batch, which is
what a batch over more partitions costs more of. A ``PartitionAsk`` is a future the scatter
gathers, moved on by its requests' done callbacks and one timer (the next hedge, or the
deadline); the rules are those the coroutine had.
"""

from __future__ import annotations

import asyncio
import math
from typing import TYPE_CHECKING

from ekko.serve.scatter_fetch import (
    FlatAsk,
    FlatRows,
    HolderFailed,
    LookupRefused,
    PartitionUnavailable,
    checked,
    start,
)

if TYPE_CHECKING:
    from ekko.serve.scatter import PartitionedLookup


class PartitionAsk:
    """Partition ``p``'s rows for ``ask`` as ``future``: the first holder in the policy's
    order is asked at once, the next one after the partition's hedge delay (a hedge) or at
    once when a request fails (a retry); the first answer that fits ``ask`` wins. A holder
    refusing the request itself ends it with ``LookupRefused``; no answer by ``deadline``
    (loop time), or every holder failed, with ``PartitionUnavailable`` naming the partition.
    Cancelling ``future`` cancels the requests in flight.

    Why an object per partition and scatter: it holds what the coroutine held (requests in
    flight, holders tried, the next hedge); what scatters share is the lookup's ``policy``.
    """

    def __init__(self, lookup: PartitionedLookup, p: int, ask: FlatAsk, deadline: float) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.future: asyncio.Future[FlatRows] = loop.create_future()
        self.lookup = lookup
        self.p = p
        self.ask = ask
        self.deadline = deadline
        policy = lookup.policy
        self.counters = policy.counters[p]
        self.counters.requests += 1
        self.start = loop.time()
        self.order = policy.order(p, self.start)
        self.hedge_after = policy.hedge_after(p)
        self.running: dict[asyncio.Future, str] = {}
        self.tried: list[tuple[str, str]] = []
        self.sent = 0
        self.next_hedge = math.inf
        self._timer: asyncio.TimerHandle | None = None
        self._over = False
        lookup.asking[p] += 1
        self.future.add_done_callback(self._cancelled)
        self._launch()

    def _launch(self) -> None:
        holder = self.order[self.sent]
        self.sent += 1
        task = start(self.lookup.fetch, holder, self.ask)
        self.running[task] = holder
        task.add_done_callback(self._answered)
        now = self.loop.time()
        self.next_hedge = now + self.hedge_after if self.sent < len(self.order) else math.inf
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(min(self.deadline, self.next_hedge), self._tick)

    def _tick(self) -> None:
        """The timer: the deadline, or a hedge due."""
        self._timer = None
        if self._over:
            return
        now = self.loop.time()
        if now >= self.deadline:
            self._unavailable()
        elif now >= self.next_hedge:
            self.counters.hedges += 1
            self._launch()
        else:  # woken early: wait on
            self._timer = self.loop.call_at(min(self.deadline, self.next_hedge), self._tick)

    def _answered(self, task: asyncio.Future) -> None:
        """A request ended: the answer wins if it fits, a failure moves on to the next
        holder (or ends the partition when none is left)."""
        if task.cancelled():
            if not self._over:
                self._end(exc=asyncio.CancelledError())
            return
        exc = task.exception()  # read even when over: no "exception never retrieved"
        if self._over:
            return
        holder = self.running.pop(task)
        policy = self.lookup.policy
        if exc is None:
            try:
                answer = checked(holder, self.ask, task.result())
            except HolderFailed as bad:
                exc = bad
            else:
                now = self.loop.time()
                policy.answered(self.p, holder, now - self.start, self.running.values(), now)
                self._end(answer)
                return
        if not isinstance(exc, HolderFailed):
            self._end(exc=exc)
            return
        if not exc.retriable:
            self._end(exc=LookupRefused(self.p, exc))
            return
        self.tried.append((holder, exc.reason))
        policy.failed(holder, self.loop.time())
        if self.loop.time() >= self.deadline:
            self._unavailable()
        elif self.sent < len(self.order):
            self.counters.retries += 1
            self._launch()
        elif not self.running:
            self._unavailable()

    def _unavailable(self) -> None:
        why = f"no answer within the deadline ({self.lookup.config.deadline_s:g} s)"
        tried = self.tried + [(h, why) for h in self.running.values()]
        self.counters.unavailable += 1
        self._end(exc=PartitionUnavailable(self.p, self.ask.names, tried))

    def _end(self, answer: FlatRows | None = None, exc: BaseException | None = None) -> None:
        self._stop()
        if self.future.done():
            return
        if isinstance(exc, asyncio.CancelledError):
            self.future.cancel()
        elif exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(answer)

    def _cancelled(self, future: asyncio.Future) -> None:
        self._stop()  # idempotent: a result set by _end stopped everything already

    def _stop(self) -> None:
        """Over: the timer and the requests in flight (a lost hedge) cancelled, the
        partition no longer counted as asked."""
        if self._over:
            return
        self._over = True
        self.lookup.asking[self.p] -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self.running:
            if not task.done():
                task.cancel()
