"""A pull naming partitions is answered with their shards only (issue 17): a holder of one
partition gets exactly its rows from a store that holds every shard, and an unknown partition
is refused by name."""

from __future__ import annotations

import numpy as np

from ekko.protocol.messages import Error, PullRequest, PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.responder import Responder
from ekko.store import Store, shard_of
from ekko.store.holding import Holding
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

PLACEMENT = Placement(3)
SPECS = (TableSpec("a", 4, 8), TableSpec("b", 2, 5))


def _source() -> Store:
    store = Store()
    for i, spec in enumerate(SPECS):
        t = store.create_table(spec)
        keys = np.arange(400, dtype=np.int64) + 1000 * i
        t.write(keys, np.full((400, spec.dim), i + 1, np.float32), now_ns=1)
    return store


def _pull(responder: Responder, puller: Puller, now: float = 1.0) -> None:
    """Pump the pull link until neither side has anything to send (a polling puller asks
    again only at its next poll, which ``now`` never reaches)."""
    ready = puller.start(now)
    queue = [m for _, m in ready.sends]
    for _ in range(200):
        if not queue:
            return
        answers = []
        for msg in queue:
            answers += [m for _, m in responder.receive(7, msg, now).sends]
        queue = []
        for a in answers:
            queue += [m for _, m in puller.receive(a, now).sends]
    raise AssertionError("the link did not settle")


def _rows_by_partition(store: Store) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = {}
    for t in store.tables.values():
        keys = t.all_rows()[0]
        for p in PLACEMENT.partitions_of(t.name, t.num_shards)[shard_of(keys, t.num_shards)]:
            out[t.name, int(p)] = out.get((t.name, int(p)), 0) + 1
    return out


def test_a_pull_naming_partitions_gets_their_shards_only_and_applies_them_all():
    source = _source()
    expected = {k: v for k, v in _rows_by_partition(source).items() if k[1] in (0, 2)}
    replica = Store()
    replica.set_holding(Holding("r", PLACEMENT, (0, 2)))  # refuses a row of partition 1
    puller = Puller(replica, PullerConfig(wait_ms=0, partitions=(2, 0)), latency=None)
    _pull(Responder(source, placement=PLACEMENT), puller)
    assert puller.caught_up
    assert _rows_by_partition(replica) == expected and sum(expected.values()) < 800
    for t in replica.tables.values():
        held = np.isin(PLACEMENT.partitions_of(t.name, t.num_shards), (0, 2))
        src = source.table(t.name)
        assert (t.knowledge[held] == src.knowledge[held]).all()  # caught up on its shards
        assert (t.knowledge[~held] == 0).all()


def test_a_pull_without_partitions_gets_every_shard_as_before():
    source, replica = _source(), Store()
    _pull(Responder(source, placement=PLACEMENT), Puller(replica, PullerConfig(wait_ms=0)))
    assert replica.digests() == source.digests()


def test_a_partition_the_placement_lacks_is_refused_by_name():
    responder = Responder(_source(), placement=PLACEMENT)
    ready = responder.receive(1, PullRequest(1, 1 << 20, partitions=[1, 3]), 1.0)
    ((_, err),) = ready.sends
    assert isinstance(err, Error) and err.code == "bad_partition"
    assert "partitions [1, 3] asked; this node's placement has 3 (0..2)" in err.reason
    unplaced = Responder(_source())  # one partition: 0 is every shard
    ((_, ok),) = unplaced.receive(1, PullRequest(1, 1 << 20, partitions=[0]), 1.0).sends
    assert isinstance(ok, PullResponse) and sum(c.rows for c in ok.chunks) == 800


def test_a_pull_for_partitions_this_node_holds_none_of_is_refused_by_name():
    """A holder of partition 1 asked for partition 0 answered an empty, complete response
    (``more=False``), so a puller pointed at the wrong holder believed itself caught up
    (seen at a real dc1-p1-r1 of ``ekko up --partitions 2``). One it holds among others it
    does not is still answered: a recovering source asks each replica for all of its own
    partitions and takes what that replica has. A refusal of a huge list stays short."""
    store = _source()
    store.set_holding(Holding("dc1-p1-r1", PLACEMENT, (1,)))
    responder = Responder(store, placement=PLACEMENT)
    ((_, err),) = responder.receive(1, PullRequest(1, 1 << 20, partitions=[0, 2]), 1.0).sends
    assert isinstance(err, Error) and err.code == "bad_partition"
    assert "holds none of partitions [0, 2] (it holds [1])" in err.reason
    ((_, ok),) = responder.receive(2, PullRequest(1, 1 << 20, partitions=[0, 1]), 1.0).sends
    assert isinstance(ok, PullResponse) and ok.chunks
    many = PullRequest(1, 1 << 20, partitions=list(range(100_000)))
    ((_, err),) = responder.receive(3, many, 1.0).sends
    assert isinstance(err, Error) and err.code == "bad_partition" and len(err.reason) < 400
