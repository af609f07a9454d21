"""A store holding some partitions takes rows of their shards only, within its memory budget
(issue 17): anything else is refused by name before a row is stored."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.store import Store, shard_of
from ekko.store.holding import Holding, MemoryBudgetError, NotHeldError, row_bytes
from ekko.store.placement import Placement
from ekko.store.spec import TableSpec
from ekko.store.table_frames import FRAME_NOT_HELD, FRAME_OK, frame_plan

SPEC = TableSpec("emb", 4, 8)
PLACEMENT = Placement(2)


def _keys_of(partition: int, n: int) -> np.ndarray:
    keys = np.arange(10_000, dtype=np.int64)
    parts = PLACEMENT.partitions_of("emb", 8)[shard_of(keys, 8)]
    return keys[parts == partition][:n]


def _store(max_bytes: int | None = None, partitions=(0,)) -> Store:
    store = Store()
    store.set_holding(Holding("n1", PLACEMENT, partitions, max_bytes, lambda p: f"ask p{p}"))
    return store


def _rows(keys: np.ndarray) -> np.ndarray:
    return np.ones((keys.size, 4), np.float32)


def test_rows_of_held_shards_enter_and_others_are_refused_naming_table_shard_partition():
    store = _store()
    t = store.create_table(SPEC, initial_rows=64)
    mine, theirs = _keys_of(0, 20), _keys_of(1, 3)
    t.write(mine, _rows(mine), now_ns=1)
    counter = t.counter.copy()
    mixed = np.concatenate([mine[:5], theirs])
    s = int(shard_of(theirs[:1], 8)[0])
    for attempt in (
        lambda: t.write(mixed, _rows(mixed), now_ns=2),
        lambda: t.delete(theirs, now_ns=2),
        lambda: t.apply(theirs, _rows(theirs), np.ones(3, np.int64), np.ones(3, np.int64), 0),
    ):
        with pytest.raises(NotHeldError) as err:
            attempt()
        msg = str(err.value)
        assert f"table 'emb' shard {s} is in partition 1" in msg
        assert "it holds [0]" in msg and "(ask p1)" in msg
    assert t.rows == 20 and (t.counter == counter).all()  # nothing of the refused writes


def test_every_partition_held_checks_nothing_per_row():
    store = _store(partitions=(1, 0))
    assert not store.holding.scoped
    t = store.create_table(SPEC)
    keys = np.arange(100, dtype=np.int64)
    t.write(keys, _rows(keys), now_ns=1)
    assert t.rows == 100


def test_a_table_too_large_for_the_budget_is_refused_at_creation_naming_it():
    # The node holds 1 of 2 partitions: 4 of the 8 shards, half of the initial rows.
    budget = 1000 * row_bytes(4)
    store = _store(budget)
    store.create_table(TableSpec("small", 4, 8), initial_rows=1000)  # 500 rows held: fits
    with pytest.raises(MemoryBudgetError) as err:
        store.create_table(SPEC, initial_rows=1200)  # 600 more: 1 100 rows > 1 000
    assert "table 'emb' (partitions 0" in str(err.value)
    assert "max_memory_mb" in str(err.value)
    assert list(store.tables) == ["small"]


def test_a_write_past_the_budget_is_refused_naming_table_and_partition_and_keeps_rows():
    store = _store(100 * row_bytes(4))
    t = store.create_table(SPEC, initial_rows=16)  # 8 rows promised
    keys = _keys_of(0, 130)
    t.write(keys[:90], _rows(keys[:90]), now_ns=1)
    digest = t.digest()
    with pytest.raises(MemoryBudgetError) as err:
        t.write(keys[80:], _rows(keys[80:]), now_ns=2)  # 40 new: 130 rows > 100
    msg = str(err.value)
    assert "table 'emb' partition 0: 40 new rows" in msg and "nothing of this write" in msg
    assert t.rows == 90 and t.digest() == digest
    t.write(keys[:90], 2 * _rows(keys[:90]), now_ns=3)  # updates take no new memory
    twice = np.concatenate([keys[90:100], keys[90:100]])  # 20 keys, 10 distinct and new
    t.write(twice, _rows(twice), now_ns=4)  # up to the budget exactly
    assert t.rows == 100
    with pytest.raises(MemoryBudgetError):
        t.apply(keys[100:101], _rows(keys[100:101]), np.ones(1, np.int64), np.ones(1, np.int64), 0)


def test_a_store_without_holding_takes_every_row():
    store = Store()
    t = store.create_table(SPEC, initial_rows=16)
    keys = np.arange(1000, dtype=np.int64)
    t.write(keys, _rows(keys), now_ns=1)
    assert t.rows == 1000 and t.admit is None


def test_a_lookup_frames_check_finds_the_table_checking_each_in_turn_refuses_first():
    """A holder checks a lookup frame's keys in its answer's kernel (``FramePlan``): the
    table it flags is the first ``check_held`` refuses, whose error the node sends."""
    store = _store()
    a = store.create_table(SPEC, initial_rows=64)
    b = store.create_table(TableSpec("emb_b", 4, 5), initial_rows=64)
    holding = store.holding
    plan = frame_plan(store, f"{a.name}\n{b.name}".encode(), holding)
    rng = np.random.default_rng(3)
    for _ in range(40):
        ka, kb = rng.integers(0, 200, rng.integers(1, 6)), rng.integers(0, 200, 3)
        keys = np.concatenate([ka, kb])
        first = None
        for t, (table, k) in enumerate(((a, ka), (b, kb))):
            try:
                holding.check_held(table, k)
            except NotHeldError:
                first = t
                break
        body = np.concatenate(([ka.size, kb.size], keys)).astype("<i8").view(np.uint8)
        _, status, detail = plan.answer(body, keys.size, False, 0, 1 << 20)
        assert (status, detail if first is not None else None) == (
            (FRAME_OK, None) if first is None else (FRAME_NOT_HELD, first)
        )
    unscoped = _store(partitions=(0, 1))
    for table in (a, b):
        unscoped.create_table(table.spec, initial_rows=64)
    every = frame_plan(unscoped, f"{a.name}\n{b.name}".encode(), unscoped.holding)
    body = np.concatenate(([4, 5], np.arange(9))).astype("<i8").view(np.uint8)
    assert every.answer(body, 9, False, 0, 1 << 20)[1] == FRAME_OK
