"""A small source store and a first pull of it, shared by the responder's tests."""

from __future__ import annotations

import numpy as np

from ekko.protocol.messages import Cursor, PullRequest
from ekko.store import Store
from ekko.store.spec import LANES, TableSpec


def small_source(rows: int = 10) -> Store:
    """Table ``emb`` (dim 4, 2 shards) with keys 0..rows-1 written as ones."""
    store = Store(cache_capacity=64)
    t = store.create_table(TableSpec("emb", 4, 2))
    keys = np.arange(rows, dtype=np.int64)
    t.write(keys, np.ones((rows, 4), np.float32), now_ns=1)
    return store


def first_pull(req_id: int = 1, max_bytes: int = 1 << 20, wait_ms: int = 0) -> PullRequest:
    """A session's first pull of ``emb``: cursors at 0 for every shard and lane."""
    cursors = [Cursor("emb", s, lane, 0) for s in range(2) for lane in LANES]
    return PullRequest(req_id, max_bytes, wait_ms, cursors)
