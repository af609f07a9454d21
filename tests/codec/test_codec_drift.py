"""State-based sync does not drift; sending encoded increments does.

Each round the source row takes a random-walk step. The state-based replica receives
``decode(encode(source))`` (the current value, as Ekko's sync sends it): its error is one
encoding's error, within ``max_abs_error(source)`` at every round no matter how many rounds.

Contrast (documented, not Ekko's design): a replica that adds decoded *increments* carries the
quantisation error of every past increment; the errors add up like a random walk (~sqrt of the
rounds), so after 100 rounds the error is more than twice the bound of any single increment and
it keeps growing without limit. (After only 100 small steps that drift can still be below the
state codec's bound in absolute terms; what matters is that it is not bounded at all.)
"""

from __future__ import annotations

import numpy as np
import pytest

from ekko.codec import decode_rows, encode_rows, max_abs_error

ROUNDS = 100


def _rt(x: np.ndarray, codec: str) -> np.ndarray:
    return decode_rows(encode_rows(x, codec))


def _err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).max(axis=1)


@pytest.mark.parametrize("codec", ["fp16", "int8"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_state_based_sync_has_no_drift(codec: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    source = (rng.normal(size=(256, 16)) * 0.01).astype(np.float32)
    inc_replica = source.copy()  # contrast replica starts exact: all its error is drift
    inc_bound = np.zeros(source.shape[0])  # largest single-increment bound seen per row
    inc_errors = []
    for _ in range(ROUNDS):
        step = (rng.normal(size=source.shape) * 1e-3).astype(np.float32)
        source = (source + step).astype(np.float32)

        replica = _rt(source, codec)  # state-based: send the current value
        assert (_err(replica, source) <= max_abs_error(source, codec)).all()

        inc_replica = (inc_replica + _rt(step, codec)).astype(np.float32)  # contrast
        inc_bound = np.maximum(inc_bound, max_abs_error(step, codec))
        inc_errors.append(float(_err(inc_replica, source).max()))

    # Contrast: the increment replica drifted well past what one encoding can explain, and the
    # drift grows with the number of rounds.
    assert inc_errors[-1] > 2 * inc_bound.max()
    assert np.mean(inc_errors[-10:]) > 2 * np.mean(inc_errors[:10])
