from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ekko.quality.offline import auc, log_loss


def _pairwise_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@given(
    st.lists(
        st.tuples(st.integers(0, 1), st.integers(0, 5)),  # few distinct scores: many ties
        min_size=2,
        max_size=60,
    )
)
def test_auc_matches_pair_counting_with_ties(rows: list[tuple[int, int]]) -> None:
    labels = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    if labels.min() == labels.max():
        assert math.isnan(auc(labels, scores))
    else:
        assert auc(labels, scores) == np.float64(_pairwise_auc(labels, scores))


def test_auc_extremes() -> None:
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(y, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert auc(y, np.full(4, 0.5)) == 0.5


def test_log_loss_of_a_coin() -> None:
    assert math.isclose(log_loss(np.array([0, 1]), np.array([0.5, 0.5])), math.log(2))
