"""Floors a pull session reports bound the purges of its own shards only (issue 17, hostile
and ordinary): a holder of one source's partitions knows nothing of another's shards and
reports 0 there — a follower holding partition 0 only under a replica of partitions 0 and 1,
or a hostile puller naming A's partitions with floors for B's. Counted as they came, those
zeros went up the replica's reports to source B, which then never purged a tombstone."""

from __future__ import annotations

import numpy as np
from test_multi_source import _NOW, GROUPS, PLACEMENT, _pull, cluster  # noqa: F401 (a fixture)

from ekko.protocol.floors import holder_floors, lowest
from ekko.protocol.messages import PullRequest, PullResponse
from ekko.protocol.puller import Puller, PullerConfig
from ekko.store import Store
from ekko.store.holding import Holding


def _mask(store: Store, name: str, group: int) -> np.ndarray:
    return np.isin(PLACEMENT.partitions_of(name, store.table(name).num_shards), GROUPS[group])


def _reported_up(rep: Store, responder, now: float) -> dict[str, np.ndarray]:
    """What the replica's pullers report to its sources: its own floors, at most its
    holders'."""
    return lowest(holder_floors(rep), responder.floors.all_lowest(rep, now))


def test_a_follower_of_one_sources_partitions_does_not_hold_the_others_purges_back(cluster):  # noqa: F811
    _rng, _a, _b, rep, _fol, rep_responder, _links = cluster
    own = holder_floors(rep)
    assert all(own[n][_mask(rep, n, 1)].any() for n in rep.tables)  # B's settled at the replica
    before = _reported_up(rep, rep_responder, _NOW[0] + 2)  # at the follower's report
    only_a = Store(cache_capacity=64)
    only_a.set_holding(Holding("fa", PLACEMENT, GROUPS[0]))
    puller = Puller(only_a, PullerConfig(wait_ms=0, partitions=GROUPS[0], floor_report_ms=1),
                    latency=None)  # fmt: skip
    _pull(rep_responder, puller, 77)
    _pull(rep_responder, puller, 77)  # caught up: now it reports its floors
    assert rep_responder.floors.latest(77) is not None
    up = _reported_up(rep, rep_responder, _NOW[0])  # within the horizon of its report
    theirs = holder_floors(only_a)
    for name in rep.tables:
        b, a = _mask(rep, name, 1), _mask(rep, name, 0)
        assert (up[name][b] == before[name][b]).all(), name  # B's purges: as they were
        assert (up[name][a] == np.minimum(before[name], theirs[name])[a]).all(), name


def test_floors_a_session_reports_for_another_sources_shards_are_ignored(cluster):  # noqa: F811
    _rng, _a, _b, rep, _fol, rep_responder, _links = cluster
    own = holder_floors(rep)
    zeros = {n: np.zeros((t.num_shards, 3), np.int64) for n, t in rep.tables.items()}
    ((_, resp),) = rep_responder.receive(
        91, PullRequest(1, 1 << 20, partitions=list(GROUPS[0]), floors=zeros), 1e3
    ).sends
    assert isinstance(resp, PullResponse)
    up = _reported_up(rep, rep_responder, 1e3)
    for name in rep.tables:
        b = _mask(rep, name, 1)
        assert (up[name][b] == own[name][b]).all(), name
        assert not up[name][~b].any(), name  # its own shards: held back as it asked
