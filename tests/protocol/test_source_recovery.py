"""A restarted source recovers from its replicas, and replicas converge to it exactly
(issue 13 §2; DESIGN.md §3 "Catch-up"), over the seeded faulty ``SimNetwork``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from ekko.protocol.puller import PullerConfig
from ekko.protocol.recovery import SourceRecovery
from ekko.protocol.responder import Responder
from ekko.protocol.testing import Faults, SimNetwork, rows_by_key
from ekko.store import Store, shard_of
from ekko.store.settled import Mark
from ekko.store.spec import HIGH_LANE, LANES, NEW_LANE, TableSpec

SPEC = TableSpec("emb", 4, 8)


def _store(origin: int = 0, lineage: int = 0) -> Store:
    s = Store(origin=origin, cache_capacity=64)
    s.create_table(SPEC)
    s.lineage = lineage
    return s


def _net(seed: int, faults: Faults | None = None) -> SimNetwork:
    """source -> a, b (leaders); a -> a2 (follower)."""
    net = SimNetwork(
        seed=seed,
        faults=faults or Faults(drop=0.05, duplicate=0.05),
        puller_config=PullerConfig(wait_ms=200, window=4, request_timeout_ms=500),
    )
    net.add_node("source", _store(0, lineage=7))
    net.add_node("a", _store(1), upstream="source")
    net.add_node("b", _store(2), upstream="source")
    net.add_node("a2", _store(3), upstream="a")
    return net


def _write(net: SimNetwork, rng: np.random.Generator, batches: int, key_space: int = 300) -> None:
    for _ in range(batches):
        keys = rng.integers(0, key_space, 20)
        vals = rng.standard_normal((20, SPEC.dim)).astype(np.float32)
        lanes = rng.choice(np.array(LANES, np.uint8), 20)
        net.write("source", "emb", keys, vals, lanes)
        net.run_for(0.01)


def _rows(store: Store) -> dict[int, tuple]:
    keys, values, versions, _, _ = store.table("emb").all_rows()
    return {
        int(k): (tuple(v.tolist()), int(ver))
        for k, v, ver in zip(keys, values, versions, strict=True)
    }


def _converge(net: SimNetwork, seconds: float = 30.0) -> None:
    want = net.nodes["source"].store.digests()
    end = net.now + seconds
    while net.now < end:
        net.run_for(0.2)
        if all(n.store.digests() == want for n in net.nodes.values()):
            return
    got = {name: n.store.digests() for name, n in net.nodes.items()}
    raise AssertionError(f"no convergence: source {want}, nodes {got}")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_restart_without_data_absorbs_the_replicas_then_starts_a_new_lineage(seed: int) -> None:
    """The old bug: an empty restarted source issued versions replicas already held, and
    its new writes were never pulled. Now it absorbs the replicas first; with no disk to
    tell which of their knowledge still holds, it starts a new lineage they rebuild from."""
    rng = np.random.default_rng(seed)
    net = _net(seed)
    _write(net, rng, 30)
    _converge(net)
    held = _rows(net.nodes["a"].store)
    top = int(net.nodes["a"].store.table("emb").counter.max())
    result = net.restart_source("source", _store(0))
    assert not result.kept_lineage and result.lineage != 7 and not result.missing
    src = net.nodes["source"].store
    assert _rows(src) == held  # every row a replica held is back at the source
    assert int(src.table("emb").counter.min()) > 0
    _write(net, rng, 30)
    _converge(net)
    # New versions sit above anything issued before the crash, per shard.
    assert (src.table("emb").counter >= top).any()
    assert all(n.store.lineage == result.lineage for n in net.nodes.values())


@pytest.mark.parametrize("seed", [4, 5, 6])
def test_unreachable_replica_with_rows_the_new_source_lacks_converges_exactly(seed: int) -> None:
    """Source restarted without data while a leader is cut off; that leader still holds rows
    (and versions) the new source never issued. After heal it must hold exactly the
    source's rows: nothing the source lacks kept, same digest."""
    rng = np.random.default_rng(seed)
    net = _net(seed)
    _write(net, rng, 20)
    _converge(net)
    net.cut_link("a")  # a and its follower a2 see nothing of what follows
    _write(net, rng, 20, key_space=400)  # b gets these; a does not
    net.run_for(2.0)
    b_rows = _rows(net.nodes["b"].store)
    net.cut_link("b")
    _write(net, rng, 5, key_space=500)  # reached nobody: lost with the data dir
    # Source restarts empty; b is unreachable, a (behind b) is reachable again.
    net.heal_link("a")
    result = net.restart_source("source", _store(0), unreachable=frozenset({"b"}))
    assert not result.kept_lineage and "b" in result.missing
    src = net.nodes["source"].store
    assert src.lineage not in (0, 7)
    # b holds keys the new source never got.
    assert set(b_rows) - set(_rows(src))
    _write(net, rng, 10, key_space=600)
    net.heal_link("b")
    _converge(net)
    want = _rows(src)
    for name in ("a", "a2", "b"):
        store = net.nodes[name].store
        assert _rows(store) == want, f"{name} differs from the source"
        assert store.lineage == src.lineage
    assert net.nodes["b"].puller.rebuilds + net.nodes["a"].puller.rebuilds >= 1


def test_restart_with_data_absorbs_the_unlogged_tail() -> None:
    """A source restarts with an older copy of itself (its log lost the unfsynced tail):
    rows replicas hold beyond it come back, and counters resume above them."""
    rng = np.random.default_rng(9)
    net = _net(9, Faults())
    _write(net, rng, 10)
    _converge(net)
    old = net.nodes["source"].store
    kept = _store(0, lineage=7)
    k, v, ver, wt, ln = old.table("emb").all_rows()
    t = kept.table("emb")
    t.apply(k.copy(), v.copy(), ver.copy(), wt.copy(), ln.copy())
    t.complete_origin()
    _write(net, rng, 10)  # the "unlogged tail": replicated, not in ``kept``
    _converge(net)
    want = _rows(net.nodes["b"].store)
    result = net.restart_source("source", kept)
    assert result.kept_lineage and result.rows_absorbed > 0
    assert _rows(net.nodes["source"].store) == want
    _write(net, rng, 10)
    _converge(net)
    assert net.nodes["a"].puller.rebuilds == 0


def test_absorb_takes_rows_above_the_replicas_knowledge() -> None:
    """A replica may hold rows above its knowledge (a transfer in progress, a gap); it does
    not relay them, but a recovering source takes them: otherwise its counter could stay
    below them and a new write to that key would lose to the old row at the replica."""
    rng = np.random.default_rng(11)
    net = _net(11, Faults())
    _write(net, rng, 5)
    _converge(net)
    src = net.nodes["source"].store.table("emb")
    kept = _store(0, lineage=7)
    k, v, ver, wt, ln = src.all_rows()
    kept.table("emb").apply(k.copy(), v.copy(), ver.copy(), wt.copy(), ln.copy())
    kept.table("emb").complete_origin()
    # One row at b, in a gap: version far above b's knowledge of its shard and lane.
    b = net.nodes["b"].store.table("emb")
    key = np.array([123_456], np.int64)
    shard = int(src.counter.argmax())
    while int(shard_of(key, SPEC.num_shards)[0]) != shard:
        key += 1
    high = int(src.counter[shard]) + 50
    b.apply(key, np.full((1, SPEC.dim), 9.0, np.float32), np.array([high]), np.array([1]), 0)
    assert b.knowledge[shard].max() < high
    result = net.restart_source("source", kept)
    assert result.kept_lineage
    got = net.nodes["source"].store.table("emb")
    _, versions, found = got.lookup(key)
    assert found[0] and versions[0] == high and int(got.counter[shard]) >= high
    net.write("source", "emb", key, np.full((1, SPEC.dim), 1.0, np.float32))
    _converge(net)
    assert net.nodes["b"].store.table("emb").lookup(key)[0][0, 0] == 1.0


def test_a_replica_without_the_sources_tables_does_not_stall_recovery() -> None:
    """A replica that never learnt a table (just started) holds nothing of it: the
    recovering source's cursors for it are skipped, not refused, so the recovery completes
    and keeps the lineage."""
    rng = np.random.default_rng(12)
    net = _net(12, Faults())
    net.add_node("fresh", Store(origin=4, cache_capacity=64))  # no tables, no upstream yet
    _write(net, rng, 5)
    _converge_some(net, ["a", "b", "a2"])
    result = net.restart_source("source", _copy(net.nodes["source"].store), timeout=5.0)
    assert result.kept_lineage and "fresh" in result.absorbed, result


def _copy(store: Store) -> Store:
    out = _store(0, lineage=store.lineage)
    k, v, ver, wt, ln = store.table("emb").all_rows()
    out.table("emb").apply(k.copy(), v.copy(), ver.copy(), wt.copy(), ln.copy())
    out.table("emb").complete_origin()
    return out


def _converge_some(net: SimNetwork, names: list[str], seconds: float = 30.0) -> None:
    want = net.nodes["source"].store.digests()
    end = net.now + seconds
    while net.now < end and any(net.nodes[n].store.digests() != want for n in names):
        net.run_for(0.2)


def _one_replica_cut_by_budget() -> tuple[SimNetwork, Callable[[list[int], list[int]], None]]:
    """A source and one replica on an in-order, lossless link whose answers carry one or two
    rows (a 64-byte budget), and a writer of ones at the source in the given lanes."""
    net = SimNetwork(
        seed=0,
        faults=Faults(delay=(0.001, 0.001)),  # in order, nothing lost
        puller_config=PullerConfig(wait_ms=1000, window=1, max_bytes=64),
    )
    source = Store()
    source.create_table(TableSpec("emb", 2, 1))
    source.lineage = 7
    net.add_node("source", source)
    net.add_node("r", Store(origin=1), upstream="source")

    def write(keys: list[int], lanes: list[int]) -> None:
        k = np.array(keys, np.int64)
        net.write("source", "emb", k, np.ones((len(k), 2), np.float32), np.array(lanes, np.uint8))

    return net, write


def test_counters_resume_above_the_knowledge_of_a_replica_cut_mid_answer() -> None:
    """Found while building ``ekko sim``'s knowledge check. An answer cut by its byte budget
    carries the new-key lane's knowledge (the top of a batch that also wrote high-lane rows)
    and only the first high-lane rows; the source then dies before the rest was logged. It
    recovered with its counter at the highest row the replica held, below that knowledge: its
    next new key got a version the replica claimed to hold already and never reached it. In
    order, without a lost message. Now the replica, meeting the new source process, takes
    its knowledge back below the recovered counters (none of it was settled on the disk)."""
    net, write = _one_replica_cut_by_budget()

    write([1, 2, 3, 4], [HIGH_LANE] * 4)
    net.run_for(1.0)
    disk = net.save_disk("source")  # what the log kept
    write([10, 1, 2, 3], [NEW_LANE, HIGH_LANE, HIGH_LANE, HIGH_LANE])
    net.run_for(0.0015)  # one answer: the new key, the new-key lane's knowledge, one high row
    replica = net.nodes["r"].store.table("emb")
    held = int(rows_by_key(replica)[2].max())
    assert replica.knowledge[0, NEW_LANE] > held  # the state the answer left
    result = net.restart_source("source", disk)
    assert result.kept_lineage
    src = net.nodes["source"].store.table("emb")
    top = int(src.counter[0])
    net.run_for(0.01)  # the replica meets the new process
    assert replica.knowledge[0].max() <= top
    write([20], [NEW_LANE])
    net.run_for(5.0)
    for got, want in zip(rows_by_key(replica), rows_by_key(src), strict=True):
        np.testing.assert_array_equal(got, want)


def test_a_row_brought_back_by_a_lost_write_reaches_a_replica_that_skipped_it() -> None:
    """Key 9 is written (logged), then written over in another lane (not logged yet). A
    replica pulls in between: the new-key lane's knowledge passes version 3 without key 9
    (it was superseded) and its budget ends before key 9's new row. The source dies and
    recovers from its log, key 9 back at version 3, lineage kept: the replica's knowledge
    claimed that version (it never pulled key 9) under a cut the disk did not reach, so on
    meeting the new source process it takes it back to the settled part and pulls again.
    In order, nothing lost on the link."""
    net, write = _one_replica_cut_by_budget()

    write([1, 2], [HIGH_LANE] * 2)
    net.run_for(1.0)
    net.cut_link("r")
    write([9], [NEW_LANE])  # version 3, logged
    disk = net.save_disk("source")
    write([3, 4, 5, 9], [HIGH_LANE] * 4)  # key 9 again at version 7: not logged
    net.heal_link("r")
    net.run_for(0.0025)  # one answer: new-key lane's knowledge 3 without key 9, rows 3 and 4
    assert net.restart_source("source", disk).kept_lineage
    net.run_for(5.0)
    replica = net.nodes["r"].store.table("emb")
    src = net.nodes["source"].store.table("emb")
    for got, want in zip(rows_by_key(replica), rows_by_key(src), strict=True):
        np.testing.assert_array_equal(got, want)


def _replica(origin: int, rows: list[tuple[int, int]], knowledge: int, *, settled: bool) -> Store:
    """A replica of lineage 7 holding ``rows`` (key, version) of one-shard table ``emb`` in
    the high lane, knowing it complete to ``knowledge``; ``settled``: all of that knowledge
    backed by the old source's disk (``ekko.store.settled``), else none of it."""
    s = Store(origin=origin)
    t = s.create_table(TableSpec("emb", 2, 1))
    s.lineage = 7
    keys = np.array([k for k, _ in rows], np.int64)
    versions = np.array([v for _, v in rows], np.int64)
    t.apply(keys, np.ones((len(rows), 2)), versions, np.zeros(len(rows), np.int64), HIGH_LANE)
    t.merge_knowledge(0, HIGH_LANE, knowledge)
    mark = Mark(1, 0, 0)
    s.settled.settle_back(mark, {})
    if settled:
        s.settled.observe(mark, s.knowledge_by_table())
    return s


def _absorb_in_order(replicas: list[tuple[str, Store]]) -> Store:
    """A source of lineage 7 back on an empty data dir of its own recovers from
    ``replicas`` one after the other (each one's pulls restate what the ones before gave)."""
    source = Store()
    source.create_table(TableSpec("emb", 2, 1))
    source.lineage = 7
    recovery = SourceRecovery(source, [name for name, _ in replicas])
    for name, store in replicas:
        puller, responder = recovery.pullers[name], Responder(store)
        pending = puller.start(0.0).sends
        while pending and not puller.caught_up:
            answers = [a for _, m in pending for _, a in responder.receive(("s", -1), m, 0.0).sends]
            pending = [s for a in answers for s in puller.receive(a, 0.0).sends]
    assert recovery.finish().kept_lineage
    return source


def test_a_replica_mid_transfer_claims_only_its_knowledge_to_a_recovering_source() -> None:
    """Found by ``ekko sim`` (seed 1137). A replica holding a row above a gap (a transfer in
    progress) sends it to a recovering source, but its answer claimed knowledge up to that
    row: the source pulled its next replica from there and skipped the rows in the gap, which
    that replica held newer than anything the source kept. The claim is now the replica's
    knowledge; the rows above it still come."""
    upto3 = [(k, k) for k in range(1, 4)]
    r1 = _replica(1, [*upto3, (10, 10)], 3, settled=True)  # the gap 4..9 missing
    r2 = _replica(2, [(k, k) for k in range(1, 11)], 10, settled=True)
    source = _absorb_in_order([("r1", r1), ("r2", r2)])
    keys = np.arange(1, 11, dtype=np.int64)
    _, versions, found = source.table("emb").lookup(keys)
    assert found.all() and versions.tolist() == keys.tolist()


def test_a_replica_claims_to_a_recovering_source_only_what_the_old_disk_backed() -> None:
    """Found by ``ekko sim`` (seed 5015). Key 6 was written at version 1 (replica ``b`` has
    it), then again at 5, a write the source lost. Replica ``a`` pulled in between and its
    knowledge passed 1 without key 6 (superseded then); none of it settled. Absorbing ``a``
    first, the source raised its cursors to ``a``'s claim and skipped ``b``'s key 6 — now the
    newest anywhere — so ``b`` kept a row the source never had. ``a`` now claims only its
    settled knowledge."""
    a = _replica(1, [(7, 2), (8, 3)], 3, settled=False)
    b = _replica(2, [(6, 1)], 1, settled=True)
    source = _absorb_in_order([("a", a), ("b", b)])
    _, versions, found = source.table("emb").lookup(np.array([6, 7, 8], np.int64))
    assert found.all() and versions.tolist() == [1, 2, 3]


def test_a_source_back_without_its_data_starts_a_new_lineage_so_skipped_rows_reach_all() -> None:
    """Key 9 at version 3 reaches replica ``b``; written again (version 7, another lane), it
    is skipped by ``r``'s budget-cut answer (its new-key lane's knowledge passes 3). The
    source comes back with an empty data dir and absorbs both: key 9 returns at version 3
    from ``b`` (nobody holds 7). No disk says which of ``r``'s knowledge is still true, so
    the source starts a new lineage and every replica rebuilds from it exactly."""
    net, write = _one_replica_cut_by_budget()
    net.add_node("b", Store(origin=2), upstream="source")
    write([1, 2], [HIGH_LANE] * 2)
    net.run_for(1.0)
    net.cut_link("r")
    write([9], [NEW_LANE])
    net.run_for(1.0)
    assert 9 in rows_by_key(net.nodes["b"].store.table("emb"))[0]
    net.cut_link("b")
    write([3, 4, 5, 9], [HIGH_LANE] * 4)
    net.heal_link("r")
    net.run_for(0.0025)
    assert 9 not in rows_by_key(net.nodes["r"].store.table("emb"))[0]
    net.heal_link("b")
    empty = Store()
    empty.create_table(TableSpec("emb", 2, 1))
    result = net.restart_source("source", empty)
    assert not result.kept_lineage and result.rows_absorbed > 0
    net.run_for(5.0)
    src = net.nodes["source"].store.table("emb")
    assert 9 in rows_by_key(src)[0]
    for name in ("r", "b"):
        for got, want in zip(
            rows_by_key(net.nodes[name].store.table("emb")), rows_by_key(src), strict=True
        ):
            np.testing.assert_array_equal(got, want)
