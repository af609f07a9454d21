"""A replica holding partitions of two sources (issue 17): each source's partitions are pulled
on a link of their own and kept as a history of their own (``ekko.store.sources``). A source
restarted without its data makes the replica — and the replica's followers — rebuild only
that source's shards; the other source's rows, versions and knowledge are untouched; and a
recovering source absorbs from the replica only its own partitions' rows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from ekko.protocol.messages import Error, PullRequest
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.recovery import RECOVERY_PULLER, SourceRecovery
from ekko.protocol.responder import Responder
from ekko.store import Store, shard_of
from ekko.store.holding import Holding
from ekko.store.placement import Placement
from ekko.store.settled import Mark
from ekko.store.spec import LANES, TableSpec

PLACEMENT = Placement(3)
GROUPS = ((0, 2), (1,))  # source A: partitions 0 and 2; source B: partition 1
SPECS = (TableSpec("a", 4, 8), TableSpec("b", 2, 5))


class Source:
    """A source store of one group's partitions, with its lineage and process mark (its
    log all on disk: ``durable`` = ``cut``, so what holders know of it settles)."""

    def __init__(self, group: int, lineage: int, epoch: int) -> None:
        self.group = group
        self.store = Store(cache_capacity=64)
        self.store.set_holding(Holding(f"src{group}", PLACEMENT, GROUPS[group]))
        self.store.lineage = lineage
        self.writes = 0
        self.store.mark_source = lambda: Mark(epoch, self.writes, self.writes)
        for spec in SPECS:
            self.store.create_table(spec)
        self.responder = Responder(self.store, placement=PLACEMENT)

    def write(self, rng: np.random.Generator, n: int = 200, value: float = 1.0) -> None:
        """``n`` keys of this source's partitions into every table, in every lane."""
        for spec in SPECS:
            t = self.store.table(spec.name)
            for lane in LANES:
                keys = _of_group(rng.integers(0, 1 << 30, n), spec, self.group)
                vals = np.full((keys.size, spec.dim), value + lane, np.float32)
                t.write(keys, vals, now_ns=1 + self.writes, lanes=lane)
                self.writes += 1


def _of_group(keys: np.ndarray, spec: TableSpec, group: int) -> np.ndarray:
    parts = PLACEMENT.partitions_of(spec.name, spec.num_shards)[shard_of(keys, spec.num_shards)]
    return keys[np.isin(parts, GROUPS[group])]


def _holder() -> Store:
    store = Store(cache_capacity=64)
    store.set_holding(Holding("r", PLACEMENT, range(PLACEMENT.partitions)))
    store.set_sources(PLACEMENT, GROUPS)
    return store


def _puller(store: Store, group: int, **kw) -> Puller:
    return Puller(store, PullerConfig(wait_ms=0, partitions=GROUPS[group]), latency=None, **kw)


_NOW = [0.0]


def _pull(responder: Responder, puller: Puller, sid: int) -> None:
    """Pump one link, a second after the last, until neither side has anything to send
    (a recovering source's link: until it is caught up)."""
    _NOW[0] += 1.0
    now = _NOW[0]
    queue = [m for _, m in puller.start(now).sends]
    for _ in range(400):
        if not queue or (puller.absorb and puller.caught_up):
            return
        answers = []
        for msg in queue:
            answers += [m for _, m in responder.receive(sid, msg, now).sends]
        queue = []
        for a in answers:
            queue += [m for _, m in puller.receive(a, now).sends]
    raise AssertionError("the link did not settle")


def _state(store: Store, group: int) -> dict[str, tuple]:
    """``group``'s shards of every table: rows (key -> version, lane, values), knowledge and
    counters."""
    out = {}
    for name, t in store.tables.items():
        mask = np.isin(PLACEMENT.partitions_of(name, t.num_shards), GROUPS[group])
        keys, values, versions, _, lanes = t.all_rows()
        sel = mask[shard_of(keys, t.num_shards)]
        rows = {
            int(k): (int(v), int(ln), tuple(x.tolist()))
            for k, v, ln, x in zip(keys[sel], versions[sel], lanes[sel], values[sel], strict=True)
        }
        out[name] = (rows, t.knowledge[mask].tolist())
    return out


def _rows(store: Store, group: int) -> dict[str, dict]:
    return {name: rows for name, (rows, _) in _state(store, group).items()}


@pytest.fixture
def cluster():
    """Sources A and B, a replica R of both, R's follower F of both, synced."""
    rng = np.random.default_rng(17)
    a, b = Source(0, lineage=0xA, epoch=11), Source(1, lineage=0xB, epoch=22)
    rep, fol = _holder(), _holder()
    links = {
        "ra": _puller(rep, 0), "rb": _puller(rep, 1), "fa": _puller(fol, 0),
        "fb": _puller(fol, 1),
    }  # fmt: skip
    rep_responder = Responder(rep, placement=PLACEMENT)
    for _ in range(3):  # answers of the two sources interleave
        a.write(rng)
        _pull(a.responder, links["ra"], 1)
        b.write(rng)
        _pull(b.responder, links["rb"], 1)
        _pull(rep_responder, links["fa"], 1)
        _pull(rep_responder, links["fb"], 2)
    return rng, a, b, rep, fol, rep_responder, links


def test_a_replica_of_two_sources_holds_each_exactly_under_its_lineage(cluster):
    _rng, a, b, rep, fol, _resp, links = cluster
    for src in (a, b):
        assert _state(rep, src.group) == _state(src.store, src.group)  # rows and knowledge
        assert _state(fol, src.group) == _state(src.store, src.group)
        assert rep.history(GROUPS[src.group]).lineage == fol.history(GROUPS[src.group]).lineage
    assert rep.lineages() == {0: 0xA, 1: 0xB, 2: 0xA}
    # Each link met its source's process once (its first answer), never the other's marks.
    assert [links[k].epoch_changes for k in ("ra", "rb")] == [1, 1]
    assert rep.mark((1,)) == b.store.mark() and fol.mark((0, 2)) == a.store.mark()


def test_a_pull_spanning_two_sources_is_refused_by_name(cluster):
    rep_responder = cluster[5]
    for parts in ([0, 1], None):
        ((_, err),) = rep_responder.receive(9, PullRequest(1, 1 << 20, partitions=parts),
                                            1.0).sends  # fmt: skip
        assert isinstance(err, Error) and err.code == "bad_partition"
        assert "sources" in err.reason


def test_a_source_back_without_its_data_rebuilds_only_its_shards(cluster):
    rng, a, _b, rep, fol, rep_responder, links = cluster
    kept_rep, kept_fol = _state(rep, 0), _state(fol, 0)
    sv = {n: t.shard_version.copy() for n, t in rep.tables.items()}
    b2 = Source(1, lineage=0xB2, epoch=33)  # restarted empty: a new lineage
    b2.write(rng, value=7.0)
    rb2 = _puller(rep, 1)
    _pull(b2.responder, rb2, 2)
    assert rb2.rebuilds == 1 and rep.history((1,)).lineage == 0xB2
    assert _state(rep, 1) == _state(b2.store, 1)  # B's new history exactly
    assert _state(rep, 0) == kept_rep  # A's rows, versions and knowledge untouched
    for name, t in rep.tables.items():
        a_shards = np.isin(PLACEMENT.partitions_of(name, t.num_shards), GROUPS[0])
        assert (t.shard_version[a_shards] == sv[name][a_shards]).all()
    # A's link goes on as before: same lineage, nothing to rebuild.
    a.write(rng)
    _pull(a.responder, links["ra"], 1)
    assert links["ra"].rebuilds == 0 and _state(rep, 0) == _state(a.store, 0)
    # The follower meets the new lineage on its B link only.
    _pull(rep_responder, links["fb"], 2)
    _pull(rep_responder, links["fa"], 1)
    assert links["fb"].rebuilds == 1 and links["fa"].rebuilds == 0
    assert _state(fol, 1) == _state(b2.store, 1)
    assert _state(fol, 0) == _state(a.store, 0) != kept_fol
    assert fol.lineages() == {0: 0xA, 1: 0xB2, 2: 0xA}


def test_a_recovering_source_absorbs_only_its_partitions_from_a_replica_of_two(cluster):
    rng, _a, b, _rep, _fol, rep_responder, links = cluster
    disk = b.store.copy()  # what B's disk kept
    b.write(rng, value=3.0)  # written, pulled by the replica, lost with B's process
    _pull(b.responder, links["rb"], 1)
    lost = _rows(b.store, 1)
    assert _rows(disk, 1) != lost
    disk.set_holding(Holding("src1", PLACEMENT, GROUPS[1]))  # a row of A's would raise
    recovery = SourceRecovery(disk, ["rep"], replace(RECOVERY_PULLER, partitions=GROUPS[1]))
    _pull(rep_responder, recovery.pullers["rep"], 5)
    result = recovery.finish()
    assert result.kept_lineage and result.absorbed == ["rep"] and disk.lineage == 0xB
    assert _rows(disk, 1) == lost  # every row the replica held of B's, back at B
    assert all(not rows for rows in _rows(disk, 0).values())  # nothing of A's partitions


def test_a_rebuild_of_one_source_makes_only_its_sessions_start_over(cluster):
    """The replica's responder forgets what it sent the sessions of the rebuilt source's
    partitions (their rows are gone), not the others': those are not sent again."""
    rng, _a, _b, rep, _fol, rep_responder, _links = cluster
    b2 = Source(1, lineage=0xB2, epoch=33)
    b2.write(rng)
    _pull(b2.responder, _puller(rep, 1), 2)

    def rows_of(sid: int, req_id: int, partitions: list[int]) -> tuple[int, int]:
        ((_, resp),) = rep_responder.receive(
            sid, PullRequest(req_id, 1 << 24, partitions=partitions), 99.0
        ).sends
        return sum(c.rows for c in resp.chunks), resp.lineage

    assert rows_of(1, 50, [0, 2]) == (0, 0xA)  # the follower's A session: nothing again
    rows, lineage = rows_of(2, 51, [1])  # its B session: the new history, from nothing
    assert lineage == 0xB2 and rows == sum(len(r) for r in _rows(b2.store, 1).values())


def test_purge_bars_and_key_lists_stay_within_a_sessions_partitions(cluster):
    """A's tombstones purged (bars up in A's shards at the replica): B recovering from the
    replica gets none of A's bars nor key lists — only what concerns its partitions."""
    _rng, a, b, rep, _fol, rep_responder, links = cluster
    for spec in SPECS:
        t = a.store.table(spec.name)
        keys = t.all_rows()[0][:50]
        t.delete(keys, now_ns=99)
    _pull(a.responder, links["ra"], 1)  # the tombstones reach the replica
    for spec in SPECS:
        a.store.table(spec.name).purge(a.store.table(spec.name).counter)
    _pull(a.responder, links["ra"], 1)  # then the bars
    a_shards = {
        name: np.isin(PLACEMENT.partitions_of(name, t.num_shards), GROUPS[0])
        for name, t in rep.tables.items()
    }
    assert all(rep.table(n).purge_bar[m].any() for n, m in a_shards.items())
    disk = b.store.copy()
    recovery = SourceRecovery(disk, ["rep"], replace(RECOVERY_PULLER, partitions=GROUPS[1]))
    _pull(rep_responder, recovery.pullers["rep"], 6)
    assert recovery.finish().kept_lineage
    for name, mask in a_shards.items():
        assert not disk.table(name).purge_bar[mask].any()  # A's bars stayed with A's holders
    assert recovery.pullers["rep"].reconciles.shards == 0  # and no key list of A's shards
    assert _rows(disk, 1) == _rows(b.store, 1)
