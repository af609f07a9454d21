"""``eviction.lfu_aging`` under a model's memory budget: the tables sharing a
``MemoryBudget`` age their frequencies together, and must do so after ``lfu_aging`` x their
row budgets summed sightings, as one table alone ages after ``lfu_aging`` x its own."""

from __future__ import annotations

import numpy as np
import pytest

from ekko.store.holding import row_bytes
from ekko.train.admission import AdmissionConfig
from ekko.train.eviction import EvictionConfig
from ekko.train.memory_budget import MemoryBudget
from ekko.train.slots import Slots


def _freq(table: Slots, ident: int) -> int:
    slots, stats = table.evictable()
    return int(stats.freq[table.ids_of(slots) == ident][0])


@pytest.mark.parametrize("aging", [1.0, 2.0, 10.0])
def test_tables_under_a_memory_budget_age_after_lfu_aging_times_their_budgets(aging) -> None:
    eviction = EvictionConfig(kind="lfu", lfu_aging=aging)
    memory = MemoryBudget(1 << 20, eviction)
    a, b = (Slots(4, AdmissionConfig(), eviction, memory=memory, row_bytes=row_bytes(4))
            for _ in range(2))  # fmt: skip
    period = int(aging * 8)  # sightings of both tables between halvings
    for table, ident in ((a, 1), (b, 2)):
        for _ in range(period // 2 - 1):
            table.assign(np.asarray([ident], dtype=np.int64), 0.0)
            table.end_step()
    assert (_freq(a, 1), _freq(b, 2)) == (period // 2 - 1, period // 2 - 1)  # not aged yet
    a.assign(np.asarray([1, 1], dtype=np.int64), 0.0)  # the period's last sightings
    a.end_step()
    assert (_freq(a, 1), _freq(b, 2)) == ((period // 2 + 1) // 2, (period // 2 - 1) // 2)
