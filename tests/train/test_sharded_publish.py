"""``PartitionRouter``: a rank's writes split by the cluster's placement, one sink per
partition; a row of a partition the rank has no sink for is refused by name."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.store import shard_of
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec
from ekko.train.sharded_publish import PartitionRouter
from ekko.train.sink import MemorySink


def test_rows_go_to_the_sink_of_their_partition_and_specs_to_every_sink():
    placement = Placement(3)
    sinks = {p: MemorySink() for p in range(3)}
    router = PartitionRouter(placement, sinks)
    router.create_table(TableSpec("emb_0", 2, 8))
    keys = np.arange(1000, dtype=np.int64)
    values = np.stack([keys, -keys], axis=1).astype(np.float32)
    router.write("emb_0", keys, values)
    router.delete("emb_0", keys[:10])
    where = placement.partitions_of("emb_0", 8)[shard_of(keys, 8)]
    for p, sink in sinks.items():
        assert sink.specs["emb_0"] == TableSpec("emb_0", 2, 8)
        mine = keys[where == p]
        assert sorted(sink.tables["emb_0"]) == sorted(set(mine.tolist()) - set(range(10)))
        for k in mine[mine >= 10][:5].tolist():
            np.testing.assert_array_equal(sink.tables["emb_0"][k], [k, -k])


def test_a_row_of_a_partition_without_a_sink_is_refused_by_name():
    placement = Placement(2)
    router = PartitionRouter(placement, {0: MemorySink()})
    router.create_table(TableSpec("emb_0", 1, 4))
    keys = np.arange(200, dtype=np.int64)
    other = keys[placement.partitions_of("emb_0", 4)[shard_of(keys, 4)] == 1]
    with pytest.raises(ValueError, match=r"table 'emb_0' shard \d is in partition 1, which this"):
        router.write("emb_0", other[:3], np.zeros((3, 1), np.float32))
    with pytest.raises(KeyError, match="before create_table"):
        router.write("emb_1", keys[:1], np.zeros((1, 1), np.float32))
    with pytest.raises(ValueError, match=r"partition 2 is not in \[0, 2\)"):
        PartitionRouter(placement, {2: MemorySink()})
