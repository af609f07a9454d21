"""Background tasks of a node never stop silently (issue 13 §3): a failing task is logged with
its traceback, restarted with backoff, counted, and named as down until it runs again."""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from ekko.node.metrics import task_metrics
from ekko.node.supervisor import Supervisor


class FakeTime:
    """A monotonic clock and a sleep that waits until the test lets time pass."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self._wake = asyncio.Event()
        self.sleeping = asyncio.Event()

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.sleeping.set()
        await self._wake.wait()
        self._wake.clear()
        self.sleeping.clear()
        self.now += seconds

    async def let_sleeper_go(self) -> None:
        await self.sleeping.wait()
        self._wake.set()
        for _ in range(20):  # let the restarted task run until it waits again
            await asyncio.sleep(0)


def _metrics(sup: Supervisor) -> str:
    reg = CollectorRegistry(auto_describe=False)

    class C:
        def collect(self):
            return task_metrics(sup)()

    reg.register(C())
    return generate_latest(reg).decode()


@pytest.mark.asyncio
async def test_a_failing_task_is_logged_restarted_with_backoff_counted_and_down_meanwhile(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeTime()
    sup = Supervisor(backoff_s=0.5, max_backoff_s=2.0, stable_s=60.0, clock=fake.clock,
                     sleep=fake.sleep)  # fmt: skip
    runs = 0
    healthy = asyncio.Event()
    forever = asyncio.Event()

    async def guard_loop() -> None:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0)
        if runs <= 4:
            raise ValueError(f"baseline chunk without keys (run {runs})")
        healthy.set()
        await forever.wait()

    with caplog.at_level(logging.ERROR, logger="ekko.node.supervisor"):
        sup.start("guard", guard_loop)
        for expected_runs in (1, 2, 3, 4):
            await fake.sleeping.wait()
            assert runs == expected_runs
            assert sup.down() == {"guard": f"ValueError: baseline chunk without keys (run {runs})"}
            assert 'ekko_task_up{task="guard"} 0.0' in _metrics(sup)
            await fake.let_sleeper_go()
        await asyncio.wait_for(healthy.wait(), 1.0)
    assert sup.down() == {}
    assert fake.sleeps == [0.5, 1.0, 2.0, 2.0]  # doubled, capped at max_backoff_s
    text = _metrics(sup)
    assert 'ekko_task_restarts_total{task="guard"} 4.0' in text
    assert 'ekko_task_failures_total{task="guard"} 4.0' in text
    assert 'ekko_task_up{task="guard"} 1.0' in text
    failed = [r for r in caplog.records if r.getMessage() == "task guard failed"]
    assert len(failed) == 4 and all(r.exc_info for r in failed)  # the traceback is logged
    await sup.stop()


@pytest.mark.asyncio
async def test_a_task_that_ran_long_before_failing_restarts_after_the_smallest_backoff() -> None:
    fake = FakeTime()
    sup = Supervisor(backoff_s=0.5, max_backoff_s=30.0, stable_s=10.0, clock=fake.clock,
                     sleep=fake.sleep)  # fmt: skip
    runs = 0
    forever = asyncio.Event()

    async def task() -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            fake.now += 11.0  # this run lasted longer than stable_s
        if runs <= 3:
            raise RuntimeError("boom")
        await forever.wait()

    sup.start("upstream", task)
    for _ in range(3):
        await fake.let_sleeper_go()
    assert fake.sleeps == [0.5, 1.0, 0.5]
    await sup.stop()


@pytest.mark.asyncio
async def test_one_shot_failures_are_counted_and_stop_cancels_everything() -> None:
    sup = Supervisor()

    async def fails() -> None:
        raise OSError("connection reset")

    async def never() -> None:
        await asyncio.Event().wait()

    await sup.spawn("guard_message", fails())
    assert sup.tasks["guard_message"].failures == 1 and sup.down() == {}
    task = sup.start("snapshots", never)
    with pytest.raises(ValueError, match="already running"):
        sup.start("snapshots", never)
    await sup.stop()
    assert task.cancelled()
