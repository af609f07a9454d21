"""DESIGN.md §3: knowledge merge is commutative, associative and idempotent.

Chunks covering consecutive version ranges may arrive in any order and any number of times;
the puller ends with the same rows and the same knowledge as with in-order delivery.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.protocol.messages import Chunk, PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.quality.latency import LatencyHistogram
from ekko.store import Store
from ekko.store.spec import LANES, TableSpec

SPEC = TableSpec("t", 2, 1)


def _chunks(cuts: list[int], n: int, lane: int) -> list[Chunk]:
    bounds = [0, *sorted(set(cuts)), n]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        if hi <= lo:
            continue
        versions = np.arange(lo + 1, hi + 1, dtype=np.int64)
        out.append(
            Chunk(
                table="t",
                lane=lane,
                shards=np.array([0], np.int64),
                bases=np.array([lo], np.int64),
                knowledge=np.array([hi], np.int64),
                counts=np.array([hi - lo], np.int64),
                keys=versions % 7,
                values=np.stack([versions, -versions], axis=1).astype(np.float32),
                versions=versions,
                wtimes=np.zeros(hi - lo, np.int64),
            )
        )
    return out


def _deliver(chunks: list[Chunk]) -> Store:
    store = Store()
    store.create_table(SPEC)
    puller = Puller(store, PullerConfig(), LatencyHistogram())
    puller.start(now=0.0)  # the session's restatement is sent; gaps are now held, not reset
    for i, c in enumerate(chunks):
        puller.receive(PullResponse(i, 0, [c]), now=0.0)
    return store


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 40),
    cuts=st.lists(st.integers(1, 39), max_size=8),
    lane=st.sampled_from(LANES),
    data=st.data(),
)
def test_any_order_any_duplicates_same_result(n, cuts, lane, data):
    chunks = _chunks([c for c in cuts if c < n], n, lane)
    reference = _deliver(chunks)
    shuffled = data.draw(st.permutations(chunks))
    dupes = data.draw(st.lists(st.sampled_from(chunks), max_size=5))
    got = _deliver(list(shuffled) + dupes)
    t_ref, t_got = reference.table("t"), got.table("t")
    assert int(t_got.knowledge[0, lane]) == n == int(t_ref.knowledge[0, lane])
    assert t_got.knowledge.sum() == n  # no other lane moved
    assert t_got.digest() == t_ref.digest()
