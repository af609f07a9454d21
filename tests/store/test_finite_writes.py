"""The source write boundary refuses NaN, inf and finite but absurd values (beyond the table's
``max_abs``): once versioned, a row reaches every replica and every prediction that reads it."""

from __future__ import annotations

import re

import numpy as np
import pytest

from ekko.store import DEFAULT_MAX_ABS, BadRowsError, ReferenceTable, Table
from ekko.store.spec import LANES, TableSpec

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
    with pytest.raises(BadRowsError, match=r"table 'emb': values\[1\]\[2\] is NaN or inf"):
        table.write(keys, values, now_ns=2, lanes=lane)
    stored, _versions, _found = table.lookup(keys)
    np.testing.assert_array_equal(stored, 1.0)  # nothing of the refused batch was written


@pytest.mark.parametrize("lane", LANES)
@pytest.mark.parametrize("kind", [Table, ReferenceTable])
@pytest.mark.parametrize("max_abs", [DEFAULT_MAX_ABS, 2.5])
def test_source_write_beyond_max_abs_is_refused_naming_row_and_column(kind, lane, max_abs) -> None:
    table = kind(SPEC)
    assert table.max_abs == DEFAULT_MAX_ABS  # the documented default
    table.max_abs = max_abs
    keys = np.arange(3, dtype=np.int64)
    edge = np.full((3, SPEC.dim), -max_abs, np.float32)
    table.write(keys, edge, now_ns=1, lanes=lane)  # the bound itself is accepted
    for bad in (np.float32(3e38), np.nextafter(np.float32(max_abs), np.float32(np.inf))):
        values = np.zeros((3, SPEC.dim), np.float32)
        values[2, 1] = -bad
        why = re.escape(f"table 'emb': values[2][1] is -{float(bad):.9g}, beyond ±{max_abs:g}")
        with pytest.raises(BadRowsError, match=why):
            table.write(keys, values, now_ns=2, lanes=lane)
    stored, _versions, _found = table.lookup(keys)
    np.testing.assert_array_equal(stored, edge)  # nothing of a refused batch was written
