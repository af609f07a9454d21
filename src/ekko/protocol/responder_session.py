"""What a responder remembers of one puller's session, and a pull it parked.

Apart from ``responder`` because it is the state, not the rules: the responder's answering,
parking and pacing and its scope of partitions, histories and purges
(``responder_scope``) all read and move the same per-session record, kept here in one
place with what it means.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ekko.protocol.floors import PurgeNotices
from ekko.protocol.messages import PullRequest
from ekko.protocol.ready import SessionId
from ekko.protocol.shard_scope import SessionScope
from ekko.schedule.pacing import LinkPacer
from ekko.store import Table
from ekko.store.spec import LANES


@dataclass
class Parked:
    """A pull waiting (long-poll) until the store moves or its wait runs out."""

    request: PullRequest
    expires_at: float


@dataclass
class Session:
    """What the responder sent one puller's session, so that pulls in flight each carry new
    rows, and how that session is answered (its codec, pacing, partitions and purges)."""

    sent: dict[str, np.ndarray] = field(default_factory=dict)  # table -> int64 [S, lanes]
    seen: dict[str, np.ndarray] = field(default_factory=dict)  # table -> int64 [S]
    catalog_version: int = -1
    parked: deque[Parked] = field(default_factory=deque)
    codec: str | None = None  # as the last pull asked
    pacer: LinkPacer | None = None  # the session's link is paced at its bandwidth
    paced_until: float | None = None  # rows wait for the pacer's tokens until then
    turn: int = 0  # which table a truncated answer starts with, round robin
    rows_at: float | None = None  # when the session was last answered with rows
    holds_at: float | None = None  # when an empty answer last said what the session holds
    max_unframed: int | None = None  # answers with rows the host may hold before framing
    unframed: int = 0  # answers with rows handed out, not yet reported ``framed``
    absorb: bool = False  # a recovering source: rows above our knowledge go too
    scope: SessionScope = field(default_factory=SessionScope)  # the partitions asked for
    purges: PurgeNotices = field(default_factory=PurgeNotices)
    sid: SessionId | None = None  # the key it is kept under
    lineage: int | None = None  # of its partitions' source when it was last answered

    def forget(self) -> None:
        """The puller holds nothing this session was sent: start from nothing."""
        self.sent.clear()
        self.seen.clear()
        self.catalog_version = -1
        self.purges = PurgeNotices()

    def state_for(self, table: Table) -> tuple[np.ndarray, np.ndarray]:
        sent = self.sent.get(table.name)
        if sent is None:
            sent = self.sent[table.name] = np.zeros((table.num_shards, len(LANES)), np.int64)
            self.seen[table.name] = np.full(table.num_shards, -1, np.int64)
        return sent, self.seen[table.name]
