"""Pre-image log: restoring a checkpoint gives exactly the state at that checkpoint (§6)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ekko.guard.errors import GuardConfigError, PreimageError
from ekko.guard.preimages import Coalesce, PreimageLog, coalesce_indices

DIM = 3
TABLES = ("t0", "t1")

write_op = st.tuples(
    st.just("write"), st.sampled_from(TABLES), st.lists(st.integers(0, 30), min_size=1, max_size=12)
)
op = st.one_of(
    write_op,
    write_op,
    write_op,
    st.tuples(st.just("mark")),
    st.tuples(st.just("rollback"), st.integers(0, 50)),
)


class DictStore:
    """Reference store: table -> {key: (row, version)}; writes go through the pre-image log."""

    def __init__(self, log: PreimageLog) -> None:
        self.rows: dict[str, dict[int, tuple[np.ndarray, int]]] = {t: {} for t in TABLES}
        self.log = log
        self.counter = 0

    def write(self, table: str, keys: list[int], now: float) -> None:
        rows = self.rows[table]
        k = np.array(keys, np.int64)
        prev = np.array(
            [rows[x][0] if x in rows else np.zeros(DIM) for x in keys], np.float32
        ).reshape(-1, DIM)
        ver = np.array([rows[x][1] if x in rows else 0 for x in keys], np.int64)
        ex = np.array([x in rows for x in keys])
        # Within one batch the store applies writes in order, so a repeated key's later
        # pre-image is the earlier write's value; keep-first must still return the original.
        for j, x in enumerate(keys):
            if j and x in keys[:j]:
                prev[j] = rows[x][0]
                ver[j] = rows[x][1]
                ex[j] = True
            self.counter += 1
            rows[x] = (np.full(DIM, self.counter, np.float32), self.counter)
        self.log.record(table, k, prev, ver, ex, now)

    def snapshot(self) -> dict[str, dict[int, tuple[float, ...]]]:
        return {t: {k: tuple(v[0].tolist()) for k, v in r.items()} for t, r in self.rows.items()}

    def restored(self, to_time: float) -> dict[str, dict[int, tuple[float, ...]]]:
        out = self.snapshot()
        for t in TABLES:
            keys, values, existed = self.log.restore_set(t, to_time)
            for key, val, ex in zip(keys.tolist(), values, existed.tolist(), strict=True):
                if ex:
                    out[t][key] = tuple(val.tolist())
                else:
                    out[t].pop(key, None)
        return out

    def apply_restore(self, to_time: float) -> None:
        for t in TABLES:
            keys, values, existed = self.log.restore_set(t, to_time)
            for key, val, ex in zip(keys.tolist(), values, existed.tolist(), strict=True):
                if ex:
                    self.rows[t][key] = (val.copy(), -1)
                else:
                    self.rows[t].pop(key, None)
        self.log.rolled_back(to_time)


def run(ops: list, log: PreimageLog) -> tuple[DictStore, dict[float, dict]]:
    store = DictStore(log)
    snapshots: dict[float, dict] = {}
    now = 0.0
    for o in ops:
        now += 1.0
        if o[0] == "write":
            store.write(o[1], o[2], now)
        elif o[0] == "mark":
            log.mark_healthy(now)
            snapshots[now] = store.snapshot()
        elif log.checkpoints:
            cps = log.checkpoints
            target = cps[o[1] % len(cps)]
            store.apply_restore(target)
            assert store.snapshot() == snapshots[target]
            for later in [c for c in snapshots if c > target]:
                del snapshots[later]
        check_all(store, snapshots)
    return store, snapshots


def check_all(store: DictStore, snapshots: dict[float, dict]) -> None:
    for cp in store.log.checkpoints:
        assert store.restored(cp) == snapshots[cp]
        assert store.restored(cp + 0.5) == snapshots[cp]  # to_time between checkpoints


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40))
def test_restore_gives_exactly_the_state_at_each_checkpoint(ops: list) -> None:
    run(ops, PreimageLog(window_s=1e9, max_rows=10**9))


@settings(max_examples=200, deadline=None)
@given(st.lists(op, max_size=40), st.integers(1, 40), st.floats(3.0, 30.0))
def test_bounded_log_restores_exactly_what_it_still_claims(
    ops: list, max_rows: int, window_s: float
) -> None:
    log = PreimageLog(window_s=window_s, max_rows=max_rows)
    earliest_seen: list[float] = []
    store = DictStore(log)
    snapshots: dict[float, dict] = {}
    now = last_call = 0.0
    for o in ops:
        now += 1.0  # "rollback" ops here only let time pass
        if o[0] == "write":
            store.write(o[1], o[2], now)
            last_call = now
        elif o[0] == "mark":
            log.mark_healthy(now)
            snapshots[now] = store.snapshot()
            last_call = now
        assert log.rows <= max_rows
        cps = log.checkpoints
        if cps:
            # Aged-out checkpoints are dropped at the next record / mark_healthy.
            assert len(cps) == 1 or cps[0] >= last_call - window_s
            if earliest_seen and earliest_seen[-1] is not None:
                assert log.earliest_restorable >= earliest_seen[-1]  # only moves forward
            with pytest.raises(PreimageError, match="earliest restorable"):
                log.restore_set("t0", cps[0] - 0.5)
        earliest_seen.append(log.earliest_restorable)
        check_all(store, snapshots)


def test_earliest_restorable_moves_forward_when_rows_overflow() -> None:
    log = PreimageLog(max_rows=10)
    store = DictStore(log)
    log.mark_healthy(1.0)
    store.write("t0", [1, 2, 3, 4], 1.5)
    log.mark_healthy(2.0)
    store.write("t0", [5, 6, 7, 8], 2.5)
    assert log.earliest_restorable == 1.0
    log.mark_healthy(3.0)
    store.write("t0", [9, 10, 11], 3.5)  # 11 rows > 10: the oldest checkpoint goes
    assert log.earliest_restorable == 2.0 and log.rows == 7
    with pytest.raises(PreimageError, match=r"restorable checkpoint is 2\.0"):
        log.restore_set("t0", 1.5)
    store.write("t1", list(range(20)), 4.0)  # newest segment alone overflows
    assert log.earliest_restorable is None and log.rows == 0
    log.mark_healthy(5.0)
    assert log.earliest_restorable == 5.0


def test_window_drops_old_checkpoints_but_keeps_the_newest() -> None:
    log = PreimageLog(window_s=10.0)
    log.mark_healthy(0.0)
    log.mark_healthy(5.0)
    log.mark_healthy(12.0)
    assert log.checkpoints == [5.0, 12.0]
    log.record("t0", np.array([1]), np.zeros((1, 2)), np.zeros(1), np.ones(1, bool), now=100.0)
    assert log.checkpoints == [12.0]
    s = log.stats(100.0)
    assert (s.rows, s.checkpoints, s.earliest_restorable) == (1, 1, 12.0)


def test_keep_first_across_many_writes_holds_one_row_per_key() -> None:
    log = PreimageLog()
    log.mark_healthy(0.0)
    for i in range(50):
        log.record(
            "t",
            np.arange(100),
            np.full((100, 4), float(i)),
            np.full(100, i),
            np.ones(100, bool),
            now=float(i),
        )
    keys, values, existed = log.restore_set("t", 0.0)
    assert log.rows == 100
    assert np.array_equal(keys, np.arange(100)) and (values == 0.0).all() and existed.all()
    assert (log.restore_plan("t", 0.0).versions == 0).all()


def test_writes_before_any_checkpoint_are_not_restorable() -> None:
    log = PreimageLog()
    log.record("t", np.array([1]), np.zeros((1, 2)), np.zeros(1), np.ones(1, bool), now=0.0)
    assert log.rows == 0
    with pytest.raises(PreimageError):
        log.restore_set("t", 0.0)


def test_unknown_table_restores_nothing() -> None:
    log = PreimageLog()
    log.mark_healthy(0.0)
    keys, values, existed = log.restore_set("nope", 1.0)
    assert keys.size == values.shape[0] == existed.size == 0


def test_coalesce_modes() -> None:
    keys = np.array([5, 3, 5, 3, 7])
    assert coalesce_indices(keys, Coalesce.KEEP_FIRST).tolist() == [1, 0, 4]
    assert coalesce_indices(keys, Coalesce.KEEP_LAST).tolist() == [3, 2, 4]
    assert PreimageLog().coalesce is Coalesce.KEEP_FIRST


def test_bad_input_is_rejected() -> None:
    with pytest.raises(GuardConfigError, match="max_rows"):
        PreimageLog(max_rows=0)
    with pytest.raises(GuardConfigError, match="window_s"):
        PreimageLog(window_s=0)
    log = PreimageLog()
    log.mark_healthy(0.0)
    with pytest.raises(ValueError, match="prev_values"):
        log.record("t", np.array([1, 2]), np.zeros((1, 2)), np.zeros(2), np.ones(2), now=1.0)
    log.record("t", np.array([1]), np.zeros((1, 2)), np.zeros(1), np.ones(1), now=1.0)
    with pytest.raises(ValueError, match="dim 2"):
        log.record("t", np.array([1]), np.zeros((1, 3)), np.zeros(1), np.ones(1), now=1.0)
    with pytest.raises(ValueError, match="before the last checkpoint"):
        log.mark_healthy(-1.0)
