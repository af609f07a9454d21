"""``[[models]] memory_budget_mb`` takes a finite positive number of MB and nothing else,
refused naming the field where the config is read: a TOML string ``"5"`` or a boolean
``true`` were read as 5 MB and 1 MB (pydantic's lax numbers), a budget nobody wrote."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from ekko.node.config_models import ModelConfig


@pytest.mark.parametrize(
    "value",
    [
        float("nan"),
        float("inf"),
        1e300,
        -1.0,
        0,
        "5",
        "nan",
        "abc",
        True,
        [1],
    ],
)
def test_an_absurd_memory_budget_is_refused_by_name(value) -> None:
    with pytest.raises(ValidationError, match="memory_budget_mb"):
        ModelConfig(row_budget=10, memory_budget_mb=value)


@pytest.mark.parametrize("value", [1, 0.5, 2.25])
def test_a_number_of_mb_is_taken(value) -> None:
    assert ModelConfig(row_budget=10, memory_budget_mb=value).memory_budget_bytes == int(
        value * (1 << 20)
    )
