"""A count of the times any table's arrays were replaced (an index rehashed, row columns
grown, an index rebuilt from a restore, a table made).

Why: a kernel over several tables at once (``ekko.store.table_frames``, a holder's lookup
frame) is handed those tables' arrays in typed lists built once per set of tables and kept;
building them costs more than the lookup itself. They stay valid while this count has not
moved: whatever replaces an array bumps it, after the new array is in place, and the kept
lists are dropped at the next lookup. Writes into the arrays in place do not count.
"""

from __future__ import annotations

_generation = [0]


def bump() -> None:
    """Some table's arrays were just replaced."""
    _generation[0] += 1


def generation() -> int:
    return _generation[0]
