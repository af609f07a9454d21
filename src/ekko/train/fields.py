"""Range checks for the numeric fields of the training configs built from Python.

Why: the cluster's TOML is checked strictly by pydantic, but ``EvictionConfig`` and
``AdmissionConfig`` are also built directly (tests, notebooks, ``ekko.torch`` users), where a
string raised a bare ``TypeError`` from ``<`` and a bool passed as 1. Each check names the field.
"""

from __future__ import annotations

import math
from typing import Any


def real(field: str, value: Any, low: float, high: float) -> float:
    """``value`` as a float in ``(low, high]``; ``ValueError`` naming ``field`` otherwise (a
    bool, a string, NaN, inf or out of range)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number in ({low:g}, {high:g}]: {value!r}")
    if not (math.isfinite(value) and low < value <= high):
        raise ValueError(f"{field} must be in ({low:g}, {high:g}]: {value!r}")
    return float(value)


def integer(field: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; ``ValueError`` naming ``field`` otherwise (a
    bool, a float, a string or out of range)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field} must be an integer in [{low}, {high}]: {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{field} must be in [{low}, {high}]: {value!r}")
    return value
