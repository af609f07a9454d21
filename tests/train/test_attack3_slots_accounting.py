"""Every row that leaves a dynamic table is reported once, whatever the policy: the publisher
turns ``Slots.take_freed`` (and ``assign``'s evicted ids) into the store's deletes, so an id
that left unreported would stay alive in the store and at every replica, and one reported
twice or never held would delete a row another id owns. Drawn over every eviction kind
(``EVICTION_KINDS``, the rate score's extreme priors and patiences included), with and
without a ``MemoryBudget`` shared by tables of different widths, with resumes from a store
holding more than fits (``load``) and rollbacks (``drop``, which free without reporting)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.store.holding import row_bytes
from ekko.train.admission import ADMISSION_KINDS, AdmissionConfig
from ekko.train.eviction import EVICTION_KINDS, EvictionConfig
from ekko.train.memory_budget import MemoryBudget
from ekko.train.slots import Slots

OPS = st.sampled_from(["step", "step", "step", "load", "drop"])
IDS = st.lists(st.lists(st.integers(0, 60), max_size=20), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(EVICTION_KINDS),
    ttl=st.none() | st.floats(0.5, 20.0),
    admission=st.sampled_from(ADMISSION_KINDS),
    idle_rows=st.booleans(),
    prior=st.sampled_from([1e-9, 0.5, 40.0, 1e9]),
    patience=st.sampled_from([1e-9, 3.0, 1e6]),
    dims=st.lists(st.integers(1, 16), min_size=1, max_size=3),
    row_budget=st.integers(1, 30),
    budget_rows=st.none() | st.integers(1, 50),
    ops=st.lists(st.tuples(OPS, IDS), min_size=1, max_size=15),
)
def test_every_row_that_leaves_is_reported_once_and_held_ids_read_their_rows(
    kind, ttl, admission, idle_rows, prior, patience, dims, row_budget, budget_rows, ops
) -> None:
    if kind == "ttl" and ttl is None:
        ttl = 3.0
    eviction = EvictionConfig(kind, ttl, rate_prior_steps=prior, rate_patience=patience)
    memory = None
    if budget_rows is not None:
        memory = MemoryBudget(budget_rows * row_bytes(max(dims)), eviction)
    cfg = AdmissionConfig(kind=admission, threshold=2, probability=0.5, idle_rows=idle_rows)
    tables = [Slots(row_budget, cfg, eviction, memory=memory, row_bytes=row_bytes(d)) for d in dims]
    held: list[set[int]] = [set() for _ in tables]
    reported: list[list[int]] = [[] for _ in tables]
    for now, (op, lists) in enumerate(ops, start=1):
        if op == "step":
            read = []
            for i, (t, ids) in enumerate(zip(tables, lists, strict=False)):
                keys = np.asarray(ids, dtype=np.int64) + 1000 * i
                slots, gone, _ = t.assign(keys, float(now))
                reported[i] += gone.tolist()
                read.append((t, keys, slots))
            for t, keys, slots in read:  # no lookup of the step lost a row another one read
                assert np.array_equal(t.read(keys), slots)
                t.end_step()
        elif op == "load":  # a resume: the store holds ids beyond what fits
            tables[0].load(np.unique(np.asarray(lists[0], dtype=np.int64)), float(now))
        else:  # a rollback dropped ids: freed, and not reported (the store deleted them)
            before = set(tables[0].live()[0].tolist())
            freed = tables[0].drop(np.asarray(lists[0], dtype=np.int64))
            dropped = before - set(tables[0].live()[0].tolist())
            assert len(dropped) == freed.size
            held[0] -= dropped
        for i, t in enumerate(tables):
            gone = reported[i] + t.take_freed()[0].tolist()
            reported[i] = []
            ids, slots = t.live()
            live = set(ids.tolist())
            assert len(gone) == len(set(gone)), f"reported twice: {sorted(gone)}"
            assert set(gone) <= held[i], f"never held: {set(gone) - held[i]}"
            assert held[i] - set(gone) <= live, f"left unreported: {held[i] - set(gone) - live}"
            held[i] = live
            assert t.rows == ids.size == len(live) <= row_budget
            assert np.unique(slots).size == slots.size and np.all(slots < row_budget)
            assert np.array_equal(t.read(ids), slots)  # each held id reads its own row
            assert np.array_equal(t.ids_of(slots), ids)
            stats = t.statistics()
            assert stats.evicted == sum(stats.evicted_by.values()) and stats.rows == t.rows
        if memory is not None:
            assert memory.used_bytes <= memory.max_bytes
