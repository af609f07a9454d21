"""``HolderGuard``: a partition holder's baseline through an incident (the guard on a
partitioned cluster), on a fake clock: frozen on ``redirect``, cleaned and reported once the
restore covers the watermark on the held partitions' shards only, released on ``healthy``;
messages out of order or about an older incident never release poison into the baseline."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.guard.baseline import LaggedStore
from ekko.guard.holder_guard import HolderGuard, WatermarkError
from ekko.guard.log import TransitionLog
from ekko.protocol.messages import Chunk
from ekko.protocol.ready import Applied
from ekko.store import Store, shard_of
from ekko.store.clock import FakeClock
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec

SPEC = TableSpec("emb", 2, 4)
PLACEMENT = Placement(2)
HEALTHY_NS = 5_000


def _chunk(keys, value: float, wtime_ns: int) -> Chunk:
    e = np.empty(0, np.int64)
    k = np.asarray(keys, np.int64)
    values = np.full((k.size, 2), value, np.float32)
    versions = np.arange(1, k.size + 1, dtype=np.int64)
    return Chunk("emb", 0, e, e, e, e, k, values, versions, np.full(k.size, wtime_ns, np.int64))


def _setup(held=(0,)):
    store = Store()
    store.create_table(SPEC)
    lagged = LaggedStore(lag_s=10.0)
    sent: list[tuple[str, dict]] = []
    clock = FakeClock()
    g = HolderGuard("h1", "m", lagged, store, PLACEMENT, held, None,
                    lambda path, body: sent.append((path, body)), clock)  # fmt: skip
    return g, store, lagged, sent


def _watermark(store: Store, mine: int, theirs: int, held=(0,)) -> dict:
    """Knowledge ``mine`` on the held partitions' shards, ``theirs`` elsewhere."""
    k = np.zeros_like(store.table("emb").knowledge)
    held_shards = np.isin(PLACEMENT.partitions_of("emb", 4), held)
    k[held_shards, 0], k[~held_shards, 0] = mine, theirs
    return {"emb": k.tolist()}


def _catch_up(store: Store, upto: int, held=(0,)) -> None:
    t = store.table("emb")
    for s in np.flatnonzero(np.isin(PLACEMENT.partitions_of("emb", 4), held)):
        t.merge_knowledge(int(s), 0, upto)


def _queue_poison(lagged: LaggedStore) -> None:
    lagged.offer(Applied((SPEC,), (_chunk([1, 2], 1.0, 1_000),), 0.0), now=0.0)
    lagged.offer(Applied((), (_chunk([1, 2, 3], 9.0, 9_000),), 1.0), now=1.0)  # poison


def test_redirect_freezes_rolled_back_drops_reports_partition_digests_healthy_releases():
    g, store, lagged, sent = _setup()
    _queue_poison(lagged)
    assert g.redirect("detected", 0)
    assert lagged.frozen and lagged.advance(100.0) == 0
    # the watermark's other-partition shards are far ahead: a holder never gets them
    assert g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 7, 99))
    assert g.pending is not None and lagged.rows_dropped == 3 and not sent
    _catch_up(store, 6)
    g.poll()
    assert not sent  # 6 < 7 on a held shard
    keys = np.arange(40, dtype=np.int64)
    mine = keys[PLACEMENT.partitions_of("emb", 4)[shard_of(keys, 4)] == 0]
    store.table("emb").apply(mine, np.ones((mine.size, 2), np.float32),
                             np.full(mine.size, 3, np.int64), np.ones(mine.size, np.int64),
                             np.zeros(mine.size, np.uint8), None)  # fmt: skip
    _catch_up(store, 7)
    g.poll()
    [(path, body)] = sent
    assert path == "guard/restored" and body["node"] == "h1" and body["epoch"] == 0
    want = store.table("emb").digest_partitions(PLACEMENT)[0]
    assert body["digests"] == {"emb": {"0": f"{want:016x}"}} and want != 0
    assert lagged.frozen  # restored, not yet healthy
    # re-anchored: the baseline the serving nodes read is the restored state, not newer
    assert lagged.store.table("emb").digest_partitions(PLACEMENT)[0] == want
    assert g.healthy(0) and not lagged.frozen
    lagged.advance(100.0)
    values, _, found = lagged.store.table("emb").lookup(np.array([1, 2, 3]))
    assert found[:2].all() and (values[found] == 1.0).all()  # no poison
    assert found[2] == (3 in mine)  # key 3: in the poison only, or restored here


def test_a_watermark_of_the_wrong_shape_is_refused_naming_the_table_and_nothing_moves():
    g, _, lagged, sent = _setup()
    _queue_poison(lagged)
    for bad, why in (({"emb": [[1, 2], [3, 4]]}, "4 shards x"), ({"emb": [1, 2, 3]}, "shape"),
                     ({"emb": [[1], [2, 3]]}, "not a shards x lanes")):  # fmt: skip
        with pytest.raises(WatermarkError, match=why):
            g.rolled_back(0, HEALTHY_NS / 1e9, bad)
    assert g.epoch == 0 and g.pending is None and lagged.rows_dropped == 0 and not sent


def test_rolled_back_before_redirect_freezes_and_the_late_redirect_is_stale():
    g, store, lagged, sent = _setup()
    _queue_poison(lagged)
    assert g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 1, 0))
    assert lagged.frozen and g.frozen_for == 0 and lagged.rows_dropped == 3
    _catch_up(store, 1)
    g.poll()
    assert len(sent) == 1
    assert not g.redirect("late", 0) and g.stale == 1  # incident 0's rollback is here
    assert g.healthy(0) and not lagged.frozen


def test_healthy_before_rolled_back_keeps_the_baseline_frozen_until_the_restore():
    g, store, lagged, sent = _setup()
    _queue_poison(lagged)
    g.redirect("detected", 0)
    assert g.healthy(0)
    assert lagged.frozen and g.healthy_early == 0  # the poison is still queued
    g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 2, 0))
    assert lagged.frozen  # dropped, but the restore is not here
    _catch_up(store, 2)
    g.poll()
    assert len(sent) == 1 and not lagged.frozen and g.healthy_early is None


def test_messages_of_an_older_incident_are_ignored():
    g, store, lagged, sent = _setup()
    g.redirect("one", 0)
    g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 0, 0))  # covered at once
    assert len(sent) == 1
    g.redirect("two", 1)
    assert g.frozen_for == 1
    assert not g.healthy(0) and lagged.frozen  # incident 0's healthy must not release 1
    assert not g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 0, 0)) and len(sent) == 1
    assert g.stale == 2 and g.status()["stale_messages"] == 2


def test_a_holder_of_no_partition_is_refused():
    with pytest.raises(ValueError, match="at least one partition"):
        _setup(held=())


def _logged(tmp_path, lagged: LaggedStore, store: Store, sent: list) -> HolderGuard:
    log_ = TransitionLog(tmp_path / "guard.log")
    return HolderGuard("h1", "m", lagged, store, PLACEMENT, (0,), log_,
                       lambda path, body: sent.append((path, body)), FakeClock())  # fmt: skip


def test_a_holder_killed_while_redirected_comes_back_frozen_and_asks_the_coordinator(tmp_path):
    store, sent = Store(), []
    store.create_table(SPEC)
    g = _logged(tmp_path, LaggedStore(10.0), store, sent)
    g.redirect("poison", 0)
    g.rolled_back(0, HEALTHY_NS / 1e9, _watermark(store, 3, 0))
    assert not sent  # killed -9 before the restore arrived
    # restarted with its data dir: an empty store and lagged store, the log read back
    store2, lagged2 = Store(), LaggedStore(10.0)
    store2.create_table(SPEC)
    g2 = _logged(tmp_path, lagged2, store2, sent)
    g2.resume(TransitionLog.read(tmp_path / "guard.log"))
    assert lagged2.frozen and g2.frozen_for == 0 and g2.epoch == 1 and g2.ask_coordinator
    _queue_poison(lagged2)  # the catch-up pull brings the current rows
    assert lagged2.advance(100.0) == 0
    g2.coordinator_says({"state": "corrupted", "incident": {"epoch": 0}})
    assert lagged2.frozen and g2.ask_coordinator
    _catch_up(store2, 3)
    g2.poll()
    assert [b["epoch"] for _, b in sent] == [0]  # reported again once covered
    g2.coordinator_says({"state": "healthy", "incident": None})  # its healthy came meanwhile
    assert not lagged2.frozen and not g2.ask_coordinator
    # released before the next restart: it comes back live, asking nothing
    lagged3 = LaggedStore(10.0)
    g3 = _logged(tmp_path, lagged3, store2, sent)
    g3.resume(TransitionLog.read(tmp_path / "guard.log"))
    assert not lagged3.frozen and g3.epoch == 1 and g3.pending is None and g3.ask_coordinator
    g3.coordinator_says({"state": "healthy", "incident": None})  # asked once: nothing to do
    assert not lagged3.frozen and not g3.ask_coordinator


def test_a_holder_restarted_without_its_data_during_an_incident_freezes_when_told(tmp_path):
    """``--fresh`` (or a log that says live) while the coordinator is in an incident: the
    holder asks the coordinator once at start and freezes its (empty) baseline, or its
    catch-up pull would put the current, maybe poisoned, rows in it ``lag_s`` later; it
    takes the incident's rolled_back, and is released when the coordinator says healthy."""
    store, sent = Store(), []
    store.create_table(SPEC)
    lagged = LaggedStore(10.0)
    g = _logged(tmp_path, lagged, store, sent)
    g.resume([])
    assert not lagged.frozen and g.ask_coordinator
    g.coordinator_says({"state": "corrupted", "incident": {"epoch": 2}})
    assert lagged.frozen and g.frozen_for == 2 and g.ask_coordinator
    _queue_poison(lagged)
    assert lagged.advance(100.0) == 0
    assert g.rolled_back(2, HEALTHY_NS / 1e9, _watermark(store, 0, 0))
    assert [b["epoch"] for _, b in sent] == [2]
    g.coordinator_says({"state": "healthy", "incident": None})
    assert not lagged.frozen and not g.ask_coordinator
    # a coordinator that is healthy: nothing frozen, asked once
    (tmp_path / "x").mkdir()
    g2 = _logged(tmp_path / "x", LaggedStore(10.0), store, sent)
    g2.resume([])
    g2.coordinator_says({"state": "healthy", "incident": None, "incidents": [{"epoch": 0}]})
    assert not g2.lagged.frozen and not g2.ask_coordinator
