"""Hostile floors, purge bars and key lists, sent as a peer would: a responder answers bad
floors with a named ``bad_floors`` error and counts nothing from them; a puller ignores
bars and key lists that do not fit its tables (counted), never raises, and loses no row."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from small_source import first_pull, small_source

from ekko.protocol.messages import Error, PullResponse, ShardKeys
from ekko.protocol.puller import Puller, PullerConfig
from ekko.protocol.responder import Responder
from ekko.store import Store

I64_MAX = 2**63 - 1
OK_FLOORS = np.zeros((2, 3), np.int64)  # small_source: table emb, 2 shards, 3 lanes

BAD_FLOORS = {
    "shape": np.zeros((3, 3), np.int64),
    "1-d": np.zeros(2, np.int64),
    "0-d": np.array(5),
    "negative": -np.ones((2, 3), np.int64),
    "float": np.zeros((2, 3), np.float32),
    "bool": np.zeros((2, 3), bool),
    "uint64 past int64": np.full((2, 3), 2**63 + 5, np.uint64),
}


@pytest.mark.parametrize("case", list(BAD_FLOORS))
def test_bad_floors_are_refused_by_name_and_hold_nothing(case: str) -> None:
    responder = Responder(small_source())
    pull = msgspec.structs.replace(first_pull(), floors={"emb": BAD_FLOORS[case]})
    [(_, answer)] = responder.receive(1, pull, 0.0).sends
    assert isinstance(answer, Error) and answer.code == "bad_floors", answer
    assert "emb" in answer.reason
    assert responder.floors.latest(1) is None
    # The session goes on: a good report is taken.
    good = msgspec.structs.replace(first_pull(2), floors={"emb": OK_FLOORS, "nope": OK_FLOORS})
    [(_, answer)] = responder.receive(1, good, 0.1).sends
    assert isinstance(answer, PullResponse)
    assert set(responder.floors.latest(1)) == {"emb"}  # a table it lacks is skipped


def _synced() -> tuple[Store, Puller, Responder]:
    source = small_source(10)
    responder = Responder(source)
    holder = Store()
    puller = Puller(holder, PullerConfig(wait_ms=0, poll_interval_ms=0))
    ready = puller.start(0.0)
    for _ in range(5):
        answers = [a for _, m in ready.sends for _, a in responder.receive(1, m, 0.0).sends]
        for a in answers:
            ready = puller.receive(a, 0.0)
    assert holder.table("emb").rows == 10
    return source, puller, holder


def _keys(shard: int, bar: list[int], keys: np.ndarray) -> list[ShardKeys]:
    return [ShardKeys("emb", shard, bar, keys)]


NO_KEYS = np.zeros(0, np.int64)
BAD_ANSWERS = {
    "bar negative": ({"emb": -np.ones((2, 3), np.int64)}, None),
    "bar float": ({"emb": np.ones((2, 3), np.float64)}, None),
    "bar uint64 past int64": ({"emb": np.full((2, 3), 2**64 - 1, np.uint64)}, None),
    "bar shape": ({"emb": np.ones((5, 3), np.int64)}, None),
    "bar unknown table": ({"zz": np.ones((2, 3), np.int64)}, None),
    "keys unknown shard": (None, _keys(7, [1, 1, 1], NO_KEYS)),
    "keys negative shard": (None, _keys(-1, [1, 1, 1], NO_KEYS)),
    "keys two lanes": (None, _keys(0, [1, 1], NO_KEYS)),
    "keys negative bar": (None, _keys(0, [-1, -1, -1], NO_KEYS)),
    "keys float": (None, _keys(0, [0, 0, 0], np.array([1.5]))),
    "keys 2-d": (None, _keys(0, [0, 0, 0], np.zeros((2, 2), np.int64))),
    "keys unknown table": (None, [ShardKeys("zz", 0, [0, 0, 0], NO_KEYS)]),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_puller_ignores_bars_and_key_lists_that_do_not_fit(case: str) -> None:
    source, puller, holder = _synced()
    table = holder.table("emb")
    before = (table.rows, table.digest(), table.purge_bar.copy())
    purge, reconcile = BAD_ANSWERS[case]
    answer = PullResponse(
        999, source.catalog_version, [], False, None, None, source.lineage, source.mark(),
        purge, reconcile,
    )  # fmt: skip
    puller.receive(answer, 0.1)  # never raises
    puller.reconciles.apply_due(holder, every=True)  # nothing waits that could raise later
    assert (table.rows, table.digest()) == before[:2]
    np.testing.assert_array_equal(table.purge_bar, before[2])
    assert len(puller.reconciles) == 0
    assert puller.statistics().refused_notices == (0 if "unknown table" in case else 1)


def test_a_key_list_far_above_knowledge_waits_and_drops_nothing() -> None:
    source, puller, holder = _synced()
    table = holder.table("emb")
    answer = PullResponse(
        999, source.catalog_version, [], False, None, None, source.lineage, source.mark(),
        None, _keys(0, [I64_MAX] * 3, NO_KEYS),
    )  # fmt: skip
    puller.receive(answer, 0.1)
    assert table.rows == 10 and len(puller.reconciles) == 1  # waits for rows that never come
