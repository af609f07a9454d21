"""The source write boundary refuses NaN and inf: once versioned, a row reaches every replica
and every prediction that reads it."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.protocol.messages import LANES, TableSpec
from ekko.store import BadRowsError, ReferenceTable, Table

SPEC = TableSpec("emb", 3, 3)


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kind", [Table, ReferenceTable])
def test_source_write_of_non_finite_values_is_refused_naming_the_row(kind, lane, bad) -> None:
    table = kind(SPEC)
    keys = np.arange(3, dtype=np.int64)
    table.write(keys, np.ones((3, SPEC.dim), np.float32), now_ns=1, lanes=lane)
    values = np.zeros((3, SPEC.dim), np.float32)
    values[1, -1] = bad
    with pytest.raises(BadRowsError, match=r"table 'emb': values\[1\] holds NaN or inf"):
        table.write(keys, values, now_ns=2, lanes=lane)
    stored, _versions, _found = table.lookup(keys)
    np.testing.assert_array_equal(stored, 1.0)  # nothing of the refused batch was written
