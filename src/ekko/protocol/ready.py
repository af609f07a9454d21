"""What a protocol step asks its driver to do before the next step (raft's ``Ready``)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from ekko.protocol.messages import Chunk, Message, ShardKeys
from ekko.store.spec import TableSpec

SessionId = Hashable


@dataclass(frozen=True)
class Applied:
    """Rows a puller applied to the store it serves from, in one step: the tables it learned
    and each chunk it applied in plain arrays (keys, values, versions, write times; a codec
    block decoded once, by the puller; a chunk may carry knowledge only), received at
    ``at``.

    Why in ``Ready``: it is the one way pulled rows leave the puller (raft's
    ``CommittedEntries``). Whoever follows the replica's updates (the guard's baseline, the
    latency histogram, parked pulls downstream) reads them here, whatever the link codec.
    Rows pulled into a store being rebuilt from another lineage are not reported: they are
    not served until the rebuild completes. ``purges``: the purge bars the store followed in
    this step (table -> int64 [shards, lanes]); ``dropped``: the key lists it reconciled
    against, after the chunks — a follower that replays the chunks must replay these too, or
    it keeps tombstones, and rows deleted while this replica was away, for ever.
    """

    tables: tuple[TableSpec, ...]
    chunks: tuple[Chunk, ...]
    at: float
    purges: dict[str, np.ndarray] | None = None
    dropped: tuple[ShardKeys, ...] = ()

    @property
    def rows(self) -> int:
        return sum(c.rows for c in self.chunks)


@dataclass
class Ready:
    """Messages to send, in order, when to call ``tick`` next (``None``: no timer), and the
    rows this step applied (``None``: none)."""

    sends: list[tuple[SessionId, Message]] = field(default_factory=list)
    wake_at: float | None = None
    applied: Applied | None = None

    def extend(self, other: Ready) -> Ready:
        self.sends.extend(other.sends)
        self.wake_at = _earliest(self.wake_at, other.wake_at)
        if other.applied is not None:
            a = self.applied
            b = other.applied
            self.applied = b if a is None else Applied(
                a.tables + b.tables, a.chunks + b.chunks, a.at,
                {**(a.purges or {}), **(b.purges or {})} or None, a.dropped + b.dropped,
            )  # fmt: skip
        return self


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)
