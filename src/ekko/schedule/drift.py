"""How far each row has moved since it last crossed in a lane that drains first."""

from __future__ import annotations

import numpy as np

from ekko.schedule.key_slots import KeySlots
from ekko.store.spec import LOW_LANE


class DriftAccumulator:
    """Sums each key's |Δ| over its writes in the low lane, because the low lane is drained
    in version order: on a link too slow for it, a row rewritten again and again moves to
    its back each time and never crosses, however far it has drifted. Ranking a write by the
    drift since its row last went in a first-drained lane (high or new-key) rather than by
    its own step promotes such a row once its small steps add up, so what a congested
    replica lacks of a row stays bounded instead of growing with how often the row is
    trained — the hot rows most predictions read.

    The sum of step norms bounds the distance moved (triangle inequality) without keeping a
    second copy of every row. A deferred row's hold is not counted: it is measured against
    the table by its next write.
    """

    def __init__(self, *, slots: int = 1 << 20) -> None:
        self._drift = KeySlots(slots, 1)

    def drift(self, table: str, keys: np.ndarray, delta_norm: np.ndarray) -> np.ndarray:
        """Each row's drift if written now: what it gathered in the low lane plus this step
        (float64[n]). Pure."""
        (drift,) = self._drift.table(table)
        return drift[self._drift.of(keys)] + np.asarray(delta_norm, np.float64)

    def settle(
        self, table: str, keys: np.ndarray, delta_norm: np.ndarray, lanes: np.ndarray
    ) -> None:
        """Record written rows: a row written in the low lane adds its step to its drift;
        in any other lane its drift starts again from zero."""
        (drift,) = self._drift.table(table)
        s = self._drift.of(keys)
        low = np.asarray(lanes) == LOW_LANE
        np.add.at(drift, s[low], np.asarray(delta_norm, np.float64)[low])
        drift[s[~low]] = 0.0
