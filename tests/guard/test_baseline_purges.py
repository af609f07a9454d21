"""The guard's lagged baseline follows what its replica did after the rows — purges and
reconciles — so its tombstones stay bounded and it keeps no row deleted upstream."""

import numpy as np

from ekko.guard.baseline import LaggedStore
from ekko.protocol.messages import Chunk, ShardKeys
from ekko.protocol.ready import Applied
from ekko.store import Table
from ekko.store.spec import HIGH_LANE, LANES, TableSpec

SPEC = TableSpec("t", 2, 1)


def _chunk(keys: np.ndarray, versions: np.ndarray, dead: np.ndarray | None = None) -> Chunk:
    n = keys.shape[0]
    one = np.zeros(1, np.int64)
    return Chunk(
        "t", HIGH_LANE, one, one, np.full(1, int(versions.max()), np.int64), np.array([n]), keys,
        np.ones((n, SPEC.dim), np.float32), versions, np.zeros(n, np.int64), dead=dead,
    )  # fmt: skip


def test_the_baseline_purges_and_reconciles_as_its_replica_did_lag_s_later() -> None:
    base = LaggedStore(lag_s=10.0)
    keys = np.arange(6, dtype=np.int64)
    base.offer(Applied((SPEC,), (_chunk(keys, keys + 1),), 0.0), now=0.0)
    dead = np.ones(2, np.uint8)
    base.offer(Applied((), (_chunk(keys[:2], np.array([7, 8]), dead),), 1.0), now=1.0)
    bar = np.zeros((1, len(LANES)), np.int64)
    bar[0, HIGH_LANE] = 8
    listed = ShardKeys("t", 0, bar[0].tolist(), keys[2:5])  # key 5 was deleted upstream
    base.offer(Applied((), (), 2.0, {"t": bar}, (listed,)), now=2.0)
    base.advance(11.5)
    t: Table = base.store.table("t")
    assert (t.rows, t.tombstones) == (4, 2)  # the purge is not due yet
    base.advance(12.5)
    assert (t.rows, t.tombstones) == (3, 0)
    assert t.lookup(keys)[2].tolist() == [False, False, True, True, True, False]
    assert t.purge_floor.tolist() == [8]
