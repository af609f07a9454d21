"""Virtual time and fake partition holders for the scatter tests (no test functions here)."""

from __future__ import annotations

import asyncio
import math
import selectors
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from ekko.client.wire import TableRows
from ekko.serve.scatter_fetch import FlatAsk, FlatRows, HolderFailed, PerTable
from ekko.store import Store, shard_of
from ekko.store.placement import Placement

T = TypeVar("T")


class _JumpSelector(selectors.BaseSelector):
    """A selector that, when nothing is ready, jumps the loop's clock to the next timer
    instead of waiting for it (trio's autojump clock, for asyncio)."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list:
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise RuntimeError("virtual time: every task waits and no timer is set (deadlock)")
        self.now += timeout
        return []

    def close(self) -> None:
        self._inner.close()

    def get_map(self) -> Mapping:
        return self._inner.get_map()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` only moves when every task waits on a timer: sleeps,
    timeouts and deadlines take no real time and happen in a fixed order."""

    def __init__(self) -> None:
        self._jump = _JumpSelector()
        super().__init__(self._jump)

    def time(self) -> float:
        return self._jump.now


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


def holder_name(partition: int, i: int) -> str:
    return f"p{partition}h{i}"


def holders_of(partitions: int, per: int = 2) -> dict[int, list[str]]:
    return {p: [holder_name(p, i) for i in range(per)] for p in range(partitions)}


class FakeHolders:
    """Holders answering from one store, each after ``delay[holder]`` virtual seconds
    (``math.inf``: never), or failing with ``fail[holder]`` (a status, None: unreachable).

    Every call is recorded (holder, loop time, tables asked), and each key asked of a holder
    is checked to belong to the holder's partition (``p{partition}h{i}``)."""

    def __init__(self, store: Store, placement: Placement) -> None:
        self.store = store
        self.placement = placement
        self.delay: dict[str, float] = {}
        self.fail: dict[str, int | None] = {}
        self.calls: list[tuple[str, float, dict[str, np.ndarray], dict[str, np.ndarray]]] = []
        self.values_sent = 0

    async def lookup(self, holder: str, ask: FlatAsk) -> FlatRows:
        """The scatter's ``Fetch``: ``ask`` per table, answered as ``__call__`` does."""
        return await PerTable(self).lookup(holder, ask)

    def asked(self, holder: str) -> list[float]:
        return [t for h, t, _, _ in self.calls if h == holder]

    async def __call__(
        self, holder: str, tables: Mapping[str, np.ndarray], known: Mapping[str, np.ndarray]
    ) -> dict[str, TableRows]:
        loop = asyncio.get_running_loop()
        self.calls.append((holder, loop.time(), dict(tables), dict(known)))
        delay = self.delay.get(holder, 0.0)
        if delay == math.inf:
            await asyncio.Event().wait()
        await asyncio.sleep(delay)
        if holder in self.fail:
            raise HolderFailed(holder, "fake failure", self.fail[holder])
        partition = int(holder[1 : holder.index("h")])
        out = {}
        for name, keys in tables.items():
            t = self.store.table(name)
            parts = self.placement.partitions_of(name, t.num_shards)[shard_of(keys, t.num_shards)]
            assert (parts == partition).all(), (holder, name, parts)
            values, versions, found = t.lookup(keys)
            if name in known:
                values = values[versions != known[name]]
            self.values_sent += values.shape[0]
            out[name] = TableRows(name, versions, found.view(np.uint8), values)
        return out
