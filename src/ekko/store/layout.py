"""The arrays of sets of tables kept for kernels over several tables at once, dropped
whenever any table's arrays are replaced (an index rehashed, row columns grown, an index
rebuilt from a restore, a table made).

Why: a holder's lookup frame (``ekko.store.table_frames``) hands its tables' arrays to one
kernel in typed lists, and building those costs more than the lookup itself, so they are
kept per set of tables. Whatever replaces an array calls ``bump`` once the new array is in
place: the kept lists go at once, so no lookup reads a replaced array and none keeps one
alive (a grown table's old columns, half its new size). Writes into the arrays in place do
not count.
"""

from __future__ import annotations

from typing import Any

kept: dict[tuple[Any, ...], Any] = {}
"""Set of tables (their ids) -> its kept arrays, and a lookup frame's tables at a store ->
its plan (``table_frames.FramePlan``, holding those arrays); a table made since the last
``bump`` cannot reuse a dropped table's id here, since making it bumped."""


def bump() -> None:
    """Some table's arrays were just replaced: drop every kept set."""
    kept.clear()
