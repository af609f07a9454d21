import numpy as np
import pytest

from ekko.store.placement import Placement, PlacementError


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 7])
def test_every_shard_has_one_partition_and_shares_are_even(partitions):
    p = Placement(partitions)
    for table in ("emb_0", "emb_1", "dense/top"):
        parts = p.partitions_of(table, 64)
        assert [p.partition_of(table, s) for s in range(64)] == parts.tolist()
        counts = np.bincount(parts, minlength=partitions)
        assert counts.max() - counts.min() <= 1
        held = np.concatenate([p.shards_of(table, 64, [q]) for q in range(partitions)])
        assert sorted(held.tolist()) == list(range(64))


def test_a_new_table_moves_no_shard_of_another():
    before = Placement(4).partitions_of("emb_3", 16)
    assert (Placement(4).partitions_of("emb_3", 16) == before).all()


def test_a_pinned_table_lives_on_its_partition():
    p = Placement(4, {"dense": 2})
    assert set(p.partitions_of("dense", 8).tolist()) == {2}
    assert p.partition_of("dense", 5) == 2
    assert p.shards_of("dense", 8, [1]).size == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [((0,), "partitions must be an integer >= 1"), ((2, {"t": 2}), "partition 2")],
)
def test_bad_placements_are_refused_by_name(args, message):
    with pytest.raises(PlacementError, match=message):
        Placement(*args)


def test_unknown_partitions_and_shards_are_refused():
    p = Placement(2)
    with pytest.raises(PlacementError, match="partition 5"):
        p.shards_of("t", 4, [5])
    with pytest.raises(PlacementError, match="shard must be >= 0"):
        p.partition_of("t", -1)
