"""WanLine arithmetic with an injected clock: bandwidth serialises frames, delay is added."""

from __future__ import annotations

import pytest

from ekko.net.wan import WanLine, WanProfile


def test_delay_only_adds_the_one_way_delay() -> None:
    line = WanLine(WanProfile(delay_ms=50))
    assert line.delivery_time(10.0, 1_000_000) == pytest.approx(10.05)
    assert line.delivery_time(10.0, 1_000_000) == pytest.approx(10.05)  # no serialisation


def test_unlimited_zero_delay_delivers_now() -> None:
    assert WanLine(WanProfile()).delivery_time(3.0, 10**9) == 3.0


def test_frames_serialise_at_the_bandwidth() -> None:
    line = WanLine(WanProfile(delay_ms=10, mbit=8))  # 8 Mbit/s = 1 byte per microsecond
    assert line.delivery_time(0.0, 1_000_000) == pytest.approx(1.0 + 0.01)
    # sent at the same instant: waits for the first to finish transmitting
    assert line.delivery_time(0.0, 500_000) == pytest.approx(1.5 + 0.01)
    assert line.busy_until == pytest.approx(1.5)
    # sent after the line went idle: starts at once
    assert line.delivery_time(5.0, 1_000) == pytest.approx(5.001 + 0.01)


def test_sent_while_busy_starts_when_the_line_frees() -> None:
    line = WanLine(WanProfile(mbit=8))
    line.delivery_time(0.0, 1_000_000)  # busy until 1.0
    assert line.delivery_time(0.4, 100_000) == pytest.approx(1.1)


def test_set_mbit_applies_to_later_frames() -> None:
    line = WanLine(WanProfile(delay_ms=0, mbit=8))
    assert line.delivery_time(0.0, 1_000_000) == pytest.approx(1.0)
    line.set_mbit(80)
    assert line.delivery_time(0.0, 1_000_000) == pytest.approx(1.1)  # queued behind the first
    line.set_mbit(None)
    assert line.delivery_time(2.0, 10**9) == pytest.approx(2.0)
    assert line.profile == WanProfile(delay_ms=0, mbit=None)


def test_deliveries_are_never_earlier_than_send_plus_delay_and_keep_order() -> None:
    line = WanLine(WanProfile(delay_ms=25, mbit=3))
    now, last = 0.0, float("-inf")
    for k in range(100):
        now += (k % 7) * 0.0003
        t = line.delivery_time(now, 100 + 37 * k)
        assert t >= now + 0.025 + (100 + 37 * k) * 8 / 3e6 - 1e-12
        assert t >= last
        last = t


@pytest.mark.parametrize("bad", [{"delay_ms": -1}, {"mbit": 0}, {"mbit": -5}])
def test_profile_validates(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        WanProfile(**bad)
