"""``unique_columns``: every column's distinct ids and each id's place among them, in one
kernel call, equal ``np.unique(column, return_inverse=True)`` of each column."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ekko.serve.scatter_replica import unique_columns


@given(
    ids=st.integers(1, 40).flatmap(
        lambda b: st.integers(1, 30).flatmap(
            lambda f: arrays(
                np.int64, (b, f), elements=st.integers(-(2**62), 2**62) | st.integers(0, 5)
            )
        )
    )
)
@settings(deadline=None, max_examples=80)  # the first example compiles the kernel
def test_every_columns_ids_as_np_unique_gives_them(ids: np.ndarray) -> None:
    keys, bounds, inverse = unique_columns(np.ascontiguousarray(ids))
    assert bounds.shape == (ids.shape[1] + 1,) and bounds[0] == 0 and bounds[-1] == keys.size
    for j in range(ids.shape[1]):
        want, where = np.unique(ids[:, j], return_inverse=True)
        got = keys[bounds[j] : bounds[j + 1]]
        assert np.array_equal(got, want)
        assert np.array_equal(inverse[:, j], where)
        assert np.array_equal(got[inverse[:, j]], ids[:, j])
