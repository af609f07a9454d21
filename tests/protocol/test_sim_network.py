"""``SimNetwork``'s faults and drivers (``ekko.protocol.testing``): one-way loss, a replica
restarted on what its disk kept, a source writing through its write port on the simulated
clock, and a run that is a function of its seed."""

from __future__ import annotations

import numpy as np

from ekko.protocol.puller import PullerConfig
from ekko.protocol.testing import Faults, SimNetwork, rows_by_key
from ekko.schedule.scheduler import SchedulerConfig, UpdateScheduler
from ekko.store import Store
from ekko.store.spec import TableSpec

SPEC = TableSpec("emb", 2, 2)


def _net(seed: int = 0, faults: Faults | None = None) -> SimNetwork:
    net = SimNetwork(seed=seed, faults=faults, puller_config=PullerConfig(wait_ms=100, window=2))
    source = Store()
    source.create_table(SPEC)
    net.add_node("source", source)
    net.add_node("leader", Store(origin=1), upstream="source")
    net.add_node("follower", Store(origin=2), upstream="leader")
    return net


def _write(net: SimNetwork, start: int, n: int = 20, **kw) -> None:
    keys = np.arange(start, start + n, dtype=np.int64)
    net.write("source", "emb", keys, np.full((n, 2), start, np.float32), **kw)


def _equal(net: SimNetwork, name: str) -> bool:
    src = net.nodes["source"].store.table("emb")
    rep = net.nodes[name].store.tables.get("emb")
    return rep is not None and all(
        np.array_equal(a, b) for a, b in zip(rows_by_key(rep), rows_by_key(src), strict=True)
    )


def test_one_way_loss_stops_answers_until_unblocked() -> None:
    net = _net()
    net.run_for(0.5)
    net.block("source", "leader")  # pulls reach the source, answers are lost
    _write(net, 0)
    net.run_for(2.0)
    assert net.nodes["leader"].store.table("emb").rows == 0
    assert net.messages_dropped > 0
    net.unblock("source", "leader")
    net.run_for(10.0)
    assert _equal(net, "leader") and _equal(net, "follower")


def test_a_replica_restarted_empty_or_on_an_old_copy_converges_with_its_follower() -> None:
    net = _net()
    _write(net, 0)
    net.run_for(2.0)
    old = net.nodes["leader"].store.copy()
    _write(net, 10)
    net.run_for(2.0)
    for store in (old, Store(origin=1)):
        net.restart_node("leader", store)
        assert net.nodes["leader"].store is store
        _write(net, 30, n=5)
        net.run_for(10.0)
        assert _equal(net, "leader") and _equal(net, "follower")


def test_held_rows_are_released_on_the_simulated_clock() -> None:
    """A source writing through its port: the scheduler holds an insignificant change and
    releases it after ``max_staleness_s`` of simulated time, to every replica."""
    config = SchedulerConfig(defer=True, defer_min_significance=100.0, max_staleness_s=0.5)
    net = _net()
    port = net.attach_port("source", lambda: UpdateScheduler(config))
    keys = np.arange(20, dtype=np.int64)
    net.write("source", "emb", keys, np.ones((20, 2), np.float32), hold=True)
    net.write("source", "emb", keys, np.full((20, 2), 1.001, np.float32), hold=True)
    assert port.next_due() is not None  # the small change is held
    net.run_for(0.3)
    leader = net.nodes["leader"].store.table("emb")
    assert (leader.lookup(keys)[0] == 1.0).all()
    net.run_for(5.0)
    assert port.next_due() is None
    assert (leader.lookup(keys)[0] == np.float32(1.001)).all()
    assert _equal(net, "leader") and _equal(net, "follower")


def test_same_seed_same_trace() -> None:
    def run(seed: int) -> str:
        net = _net(seed, Faults(drop=0.2, duplicate=0.2, delay=(0.001, 0.02)))
        for i in range(5):
            _write(net, 10 * i)
            net.run_for(0.1)
        net.run_for(5.0)
        return net.trace_hash

    assert run(4) == run(4)
    assert run(4) != run(5)


def test_a_follower_moved_to_another_upstream_converges_and_ignores_the_old_one() -> None:
    """A failover: the follower's session with its leader ends (answers still in flight from
    it are lost with the session) and it pulls from the source instead."""
    net = _net(faults=Faults(delay=(0.001, 0.05)))
    _write(net, 0)
    net.run_for(0.02)  # answers from the leader still in flight
    net.move("follower", "source")
    assert net.nodes["follower"].upstream == "source" and "follower" not in net.cut
    net.cut_link("leader")
    _write(net, 10)
    net.run_for(5.0)
    assert _equal(net, "follower") and not _equal(net, "leader")
