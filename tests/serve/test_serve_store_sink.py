"""StoreSink: the publisher's rows land in the store as versioned writes; the hook fires."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.serve import StoreSink
from ekko.store import Store, TableConflictError
from ekko.store.spec import Sink, TableSpec


def test_writes_versioned_rows_and_calls_the_hook() -> None:
    store = Store()
    calls: list[int] = []
    sink = StoreSink(store, on_write=lambda: calls.append(1), clock_ns=lambda: 123)
    assert isinstance(sink, Sink)
    spec = TableSpec("emb_0", 4, 2)
    sink.create_table(spec)
    sink.create_table(spec)  # idempotent
    keys = np.array([3, 9], dtype=np.int64)
    sink.write("emb_0", keys, np.ones((2, 4), np.float32))
    sink.write("emb_0", keys[:1], np.full((1, 4), 2.0, np.float32))
    values, versions, found = store.table("emb_0").lookup(keys)
    assert found.all()
    np.testing.assert_array_equal(values[:, 0], [2.0, 1.0])
    assert (versions > 0).all()
    _, _, _, wtimes, _ = store.table("emb_0").all_rows()
    assert (wtimes == 123).all()
    assert len(calls) == 2 and sink.rows_written == 3
    with pytest.raises(TableConflictError):
        sink.create_table(TableSpec("emb_0", 8, 2))
