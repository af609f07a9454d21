"""``Table.digest_partitions``: per-partition digests that sum to ``Table.digest`` and match the
naive reference's, so a holder of some partitions is compared with each partition's source."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store import ReferenceTable, Table, shard_of
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

_M64 = (1 << 64) - 1


def _pair(spec: TableSpec, keys: list[int], deleted: list[int]) -> tuple[Table, ReferenceTable]:
    fast, ref = Table(spec, initial_rows=4), ReferenceTable(spec)
    arr = np.array(keys, dtype=np.int64)
    vals = (np.arange(len(keys) * spec.dim, dtype=np.float32).reshape(-1, spec.dim) % 97) - 40
    for t in (fast, ref):
        t.write(arr, vals, now_ns=1)
        if deleted:
            t.delete(np.array(deleted, dtype=np.int64), now_ns=2)
    return fast, ref


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=40, unique=True),
    drop=st.integers(0, 5),
    shards=st.integers(1, 9),
    parts=st.integers(1, 4),
    dim=st.integers(1, 5),
    pin=st.booleans(),
)
def test_partition_digests_match_reference_and_sum_to_digest(
    keys: list[int], drop: int, shards: int, parts: int, dim: int, pin: bool
) -> None:
    spec = TableSpec("emb", dim, shards)
    placement = Placement(parts, {"emb": parts - 1} if pin else None)
    fast, ref = _pair(spec, keys, keys[:drop])
    got = fast.digest_partitions(placement)
    want = ref.digest_partitions(placement.partitions_of("emb", shards).tolist(), parts)
    assert got == want
    assert sorted(got) == list(range(parts))
    assert sum(got.values()) & _M64 == fast.digest() == ref.digest()
    if pin:
        assert all(d == 0 for p, d in got.items() if p != parts - 1)


def test_one_changed_row_moves_only_its_partition() -> None:
    spec = TableSpec("emb", 3, 8)
    placement = Placement(3)
    keys = list(range(200))
    a, _ = _pair(spec, keys, [])
    b, _ = _pair(spec, keys, [])
    assert a.digest_partitions(placement) == b.digest_partitions(placement)
    key = np.array([17], dtype=np.int64)
    b.write(key, np.full((1, 3), 0.5, dtype=np.float32), now_ns=3)
    da, db = a.digest_partitions(placement), b.digest_partitions(placement)
    moved = [p for p in range(3) if da[p] != db[p]]
    assert moved == [placement.partition_of("emb", int(shard_of(key, 8)[0]))]


def test_empty_table_digests_zero_everywhere() -> None:
    t = Table(TableSpec("emb", 2, 4), initial_rows=4)
    assert t.digest_partitions(Placement(3)) == {0: 0, 1: 0, 2: 0}
