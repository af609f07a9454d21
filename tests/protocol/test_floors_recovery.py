"""A source that lost its data dir recovers from its replicas after deletes were purged: a
replica that slept past the holder horizon still holds the deleted rows (their tombstones
are gone everywhere else), and absorbing them must not bring the keys back."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.recovery import RECOVERY_PULLER, SourceRecovery
from ekko.protocol.responder import Responder
from ekko.store import Store
from ekko.store.settled import Mark
from ekko.store.spec import TableSpec

SPEC = TableSpec("emb", 4, 16)


def _store(origin: int, lineage: int = 0) -> Store:
    s = Store(origin=origin, cache_capacity=64)
    s.create_table(SPEC)
    s.lineage = lineage
    return s


class _Link:
    """A puller and a responder exchanging messages in memory, 50 ms of the puller's time
    a round (pulls do not wait; a range held for the one below it is resynced in time)."""

    def __init__(self, puller: Puller, responder: Responder, sid: int) -> None:
        self.puller, self.responder, self.sid = puller, responder, sid
        self.now = 0.0
        self.ready = puller.start(self.now)

    def pump(self, rounds: int = 30, until_caught_up: bool = False) -> None:
        for _ in range(rounds):
            if until_caught_up and self.puller.caught_up:
                return  # a recovering source stops pulling a replica then
            self.now += 0.05
            sends = self.ready.sends + self.puller.tick(self.now).sends
            self.ready.sends = []
            for _, m in sends:
                for _, a in self.responder.receive(self.sid, m, self.now).sends:
                    self.ready.sends += self.puller.receive(a, self.now).sends


def _replicas() -> tuple[Store, Store, np.ndarray]:
    """Replica ``a`` holds the deletes and follows the source's purge; ``b`` slept before
    them and still holds the deleted rows. Returns (a, b, the deleted keys)."""
    source = _store(0, lineage=7)
    source.mark_source = lambda: Mark(1, 1, 1)  # every write on disk: holders settle it
    keys = np.arange(2000, dtype=np.int64)
    source.table("emb").write(keys, np.ones((2000, 4), np.float32), now_ns=1)
    responder = Responder(source)
    a, b = _store(1), _store(2)
    cfg = PullerConfig(wait_ms=0, poll_interval_ms=0)
    la, lb = _Link(Puller(a, cfg), responder, 1), _Link(Puller(b, cfg), responder, 2)
    la.pump()
    lb.pump()
    source.table("emb").delete(keys[:500], now_ns=2)
    la.pump()
    source.table("emb").purge(source.table("emb").counter)  # b no longer counts
    la.pump()
    assert a.table("emb").tombstones == 0 and a.table("emb").rows == 1500
    assert b.table("emb").rows == 2000
    return a, b, keys[:500]


@pytest.mark.parametrize("max_bytes", [1 << 20, 4000])  # 4000: lists over several answers
@pytest.mark.parametrize("order", ["ab", "ba", "interleaved"])
def test_recovery_without_data_keeps_purged_deletes_out(order: str, max_bytes: int) -> None:
    a, b, deleted = _replicas()
    fresh = Store(origin=0, cache_capacity=64)
    names = ["b", "a"] if order == "ba" else ["a", "b"]
    recovery = SourceRecovery(fresh, names, replace(RECOVERY_PULLER, max_bytes=max_bytes))
    stores = {"a": a, "b": b}
    links = [_Link(recovery.pullers[n], Responder(stores[n]), i) for i, n in enumerate(names)]
    if order == "interleaved":
        for _ in range(100):
            for link in links:
                link.pump(rounds=1, until_caught_up=True)
    else:
        for link in links:
            link.pump(rounds=100, until_caught_up=True)
    assert recovery.done()
    result = recovery.finish()
    assert not result.kept_lineage
    t = fresh.table("emb")
    assert not t.lookup(deleted)[2].any(), "a purged delete came back from a stale replica"
    assert t.rows == 1500 and t.digest() == a.table("emb").digest()
