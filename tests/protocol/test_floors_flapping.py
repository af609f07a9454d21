"""A holder whose link flaps (or a peer that reconnects in a loop) leaves one closed session
per connection, each holding purges back for the horizon: their floors must stay bounded in
memory and in the purge tick's cost, and still hold purges back exactly as far as the least
of them for as long as the latest."""

from __future__ import annotations

import numpy as np

from ekko.protocol.floors import HolderFloors

BOUND = 64  # closed sessions kept at most, whatever the reconnect rate


def test_closed_sessions_of_a_flapping_holder_stay_bounded_and_hold_back() -> None:
    rng = np.random.default_rng(3)
    floors = HolderFloors(horizon_s=600.0)
    least = np.full((4, 3), 2**40, np.int64)
    for i in range(2000):  # a reconnect every 100 ms, all within the horizon
        f = rng.integers(1000, 10_000, (4, 3))
        np.minimum(least, f, out=least)
        floors.open(i, i * 0.1)
        floors.report(i, {"emb": f}, i * 0.1)
        floors.close(i, i * 0.1 + 0.05)
    assert len(floors._closed) <= BOUND
    np.testing.assert_array_equal(floors.lowest("emb", 4, 200.0), least)
    last_close = 1999 * 0.1 + 0.05
    assert floors.lowest("emb", 4, last_close + 599.0) is not None  # the latest still counts
    assert floors.lowest("emb", 4, last_close + 600.0) is None  # and none after the horizon


def test_a_merged_holder_lacking_a_table_holds_that_table_back() -> None:
    floors = HolderFloors(horizon_s=10.0)
    for i in range(2 * BOUND):
        tables = {"emb": np.full((2, 3), 5 + i, np.int64)}
        if i == 0:
            tables["new"] = np.full((2, 3), 7, np.int64)
        floors.open(i, 0.0)
        floors.report(i, tables, 0.0)
        floors.close(i, 1.0)
    np.testing.assert_array_equal(floors.lowest("emb", 2, 2.0), np.full((2, 3), 5))
    # Only the first session reported table "new": merged with one that did not, it holds
    # the table back entirely (zero), never less than before.
    np.testing.assert_array_equal(floors.lowest("new", 2, 2.0), np.zeros((2, 3)))
