"""A source recovering from a replica that holds only some of its partitions, beside another
source's (issue 17): source A holds partitions 0 and 2, B holds 1, and replica R holds 0 and 1
— so R keeps two histories, A's of partition 0 only. A back from a crash asks every holder of
any of its partitions for all of them (``ekko.node.recover``); R refused the pull ("[2] not
held by this store"), and the rows of partition 0 that only R still had were lost."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from test_multi_source import GROUPS, PLACEMENT, SPECS, Source, _pull

from ekko.protocol.messages import Error, PullRequest
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.recovery import RECOVERY_PULLER, SourceRecovery
from ekko.protocol.responder import Responder
from ekko.store import Store, shard_of
from ekko.store.holding import Holding

R_HOLDS = (0, 1)


def _replica() -> Store:
    store = Store(cache_capacity=64)
    store.set_holding(Holding("r", PLACEMENT, R_HOLDS))
    store.set_sources(PLACEMENT, ((0,), (1,)))  # its partitions per source
    return store


def _rows_of(store: Store, partition: int) -> dict[str, dict[int, tuple]]:
    out = {}
    for spec in SPECS:
        t = store.table(spec.name)
        keys, values, versions, _, _ = t.all_rows()
        parts = PLACEMENT.partitions_of(spec.name, spec.num_shards)[shard_of(keys, t.num_shards)]
        sel = parts == partition
        out[spec.name] = {
            int(k): (int(v), tuple(x.tolist()))
            for k, v, x in zip(keys[sel], versions[sel], values[sel], strict=True)
        }
    return out


def test_a_source_recovers_its_rows_from_a_replica_holding_some_of_its_partitions():
    rng = np.random.default_rng(3)
    a, b = Source(0, lineage=0xA, epoch=11), Source(1, lineage=0xB, epoch=22)
    rep = _replica()
    ra = Puller(rep, PullerConfig(wait_ms=0, partitions=(0,)), latency=None)
    rb = Puller(rep, PullerConfig(wait_ms=0, partitions=(1,)), latency=None)
    a.write(rng)
    b.write(rng)
    _pull(a.responder, ra, 1)
    _pull(b.responder, rb, 1)
    disk = a.store.copy()  # what A's disk kept
    a.write(rng, value=5.0)  # pulled by R, then lost with A's process
    _pull(a.responder, ra, 1)
    lost = _rows_of(a.store, 0)
    assert _rows_of(disk, 0) != lost == _rows_of(rep, 0)

    responder = Responder(rep, placement=PLACEMENT)
    disk.set_holding(Holding("src0", PLACEMENT, GROUPS[0]))
    recovery = SourceRecovery(disk, ["rep"], replace(RECOVERY_PULLER, partitions=GROUPS[0]))
    _pull(responder, recovery.pullers["rep"], 5)
    result = recovery.finish()
    assert result.absorbed == ["rep"] and result.kept_lineage, recovery.reasons
    assert _rows_of(disk, 0) == lost  # every row R held of partition 0, back at A
    assert all(not rows for rows in _rows_of(disk, 1).values())  # none of B's


def test_a_pull_naming_no_partition_the_replica_holds_is_still_refused():
    rep = _replica()
    responder = Responder(rep, placement=PLACEMENT)
    ((_, err),) = responder.receive(1, PullRequest(1, 1 << 20, partitions=[2]), 1.0).sends
    assert isinstance(err, Error) and err.code == "bad_partition" and "[2]" in err.reason
