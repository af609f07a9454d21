"""Write-request validation: every bad body is a BadRequest naming the field."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.node.table_routes import BadRequest, parse_keys, parse_rows


def test_good_rows_parse_to_int64_and_float32():
    keys, values = parse_rows({"keys": [1, -2], "values": [[1, 2], [3.5, 4]]}, 2)
    assert keys.dtype == np.int64 and keys.tolist() == [1, -2]
    assert values.dtype == np.float32 and values.shape == (2, 2)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ([], "expected an object"),
        ({"keys": [1], "values": [[1, 2]], "extra": 1}, "unknown fields ['extra']"),
        ({"keys": [], "values": []}, "non-empty list"),
        ({"keys": [True], "values": [[1, 2]]}, "integer"),
        ({"keys": ["1"], "values": [[1, 2]]}, "integer"),
        ({"keys": [2**63], "values": [[1, 2]]}, "int64"),
        ({"keys": [1], "values": [[1, 2, 3]]}, "values[0]: expected 2 numbers, got 3"),
        ({"keys": [1], "values": [["a", 2]]}, "values[0]: every element must be a number"),
        ({"keys": [1, 2], "values": [[1, 2]]}, "expected a list of 2 rows"),
    ],
)
def test_bad_rows_are_rejected_with_reason(body, needle):
    with pytest.raises(BadRequest) as err:
        parse_rows(body, 2)
    assert needle in str(err.value)


def test_parse_keys_field_name():
    with pytest.raises(BadRequest, match="ids: expected"):
        parse_keys("x", field="ids")
