"""The high lane's share under a busy link: shrinks while behind, grows back after."""

from __future__ import annotations

import pytest

from ekko.schedule import LaneShareController


def test_share_halves_while_behind_and_recovers() -> None:
    c = LaneShareController(0.1, min_share=0.01, decrease=0.5, increase=1.25, interval_s=0.1)
    assert c.update(True, 0.0) == pytest.approx(0.05)
    assert c.update(True, 0.05) == pytest.approx(0.05)  # at most one step per interval
    t = 0.1
    while c.update(True, t) > 0.01:
        t += 0.1
    assert c.share == 0.01 and t < 1.0
    assert c.update(True, t + 1.0) == 0.01  # never below the floor
    t += 1.0
    while c.update(False, t) < 0.1:
        t += 0.1
    assert c.share == 0.1 and c.update(False, t + 1.0) == 0.1  # never above the base


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0.0}, {"base": 0.1, "min_share": 0.2}, {"base": 0.1, "decrease": 1.0},
     {"base": 0.1, "increase": 1.0}, {"base": 0.1, "interval_s": float("nan")}],
)  # fmt: skip
def test_bad_settings_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LaneShareController(**kwargs)
