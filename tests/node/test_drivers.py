"""The node's drivers: each a supervised loop on an injected clock (no test sleeps), and a
driver that raises is logged with its traceback, restarted, and shown in ``/ready`` (503),
``/v1/status`` (not ready, naming it) and the ``ekko_task_*`` metrics while it waits for its
restart."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from ekko.net.signed_requests import RESIGN_HEADER
from ekko.node.access import ClusterAuth
from ekko.node.config import load_config
from ekko.node.driver import Driver
from ekko.node.guard_link import ATTEMPTS, GuardLink
from ekko.node.guard_ticker import ADVANCE_S, GuardTicker
from ekko.node.http_client import ClusterHttp
from ekko.node.release_timer import TICK_S, ReleaseTimer
from ekko.node.runner import NodeRunner
from ekko.node.snapshotter import Snapshotter
from ekko.node.supervisor import Supervisor
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store.clock import FakeClock


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Let the loop run until ``cond()`` holds (a deadline, never a fixed wait)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0)


class GatedSleep:
    """The supervisor's backoff, held until the test lets it end."""

    def __init__(self) -> None:
        self.sleeping = asyncio.Event()
        self.go = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        await self.go.wait()


class FlakyDriver(Driver):
    name = "flaky"

    def __init__(self) -> None:
        self.runs = 0
        self.running = asyncio.Event()

    async def run(self) -> None:
        self.runs += 1
        if self.runs == 1:
            raise RuntimeError("flaky driver broke on its first run")
        self.running.set()
        await asyncio.Event().wait()

    def status(self) -> dict:
        return {"flaky_runs": self.runs}


async def test_a_raising_driver_is_logged_restarted_and_shown_in_ready_status_and_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)], sync={"snapshot_interval_s": 0})
    doc["durability"] = {"recovery_timeout_s": 0.5}  # run alone: no replica to recover from
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    gate = GatedSleep()
    flaky = FlakyDriver()
    runner = NodeRunner(
        cfg, "source", tmp_path, drivers=[lambda core: flaky],
        supervisor=Supervisor(sleep=gate.sleep),
    )  # fmt: skip
    node = cfg.node("source")
    with caplog.at_level(logging.ERROR, logger="ekko.node.supervisor"):
        task = asyncio.create_task(runner.run())
        await asyncio.wait_for(runner.ready.wait(), 30)
        await asyncio.wait_for(gate.sleeping.wait(), 10)
        url = f"http://{node.host}:{node.admin_port}"
        async with httpx.AsyncClient(base_url=url, auth=ClusterAuth(runner.secret)) as c:
            r = await c.get("/ready")
            assert r.status_code == 503
            down = {"flaky": "RuntimeError: flaky driver broke on its first run"}
            assert r.json()["down"] == down
            status = (await c.get("/v1/status")).json()  # the same judgement as /ready
            assert (status["ready"], status["down"], status["why"]) == (False, down, "down: flaky")
            assert status["tasks"]["flaky"]["up"] is False
            metrics = (await c.get("/metrics")).text
            assert 'ekko_task_up{task="flaky"} 0.0' in metrics
            assert 'ekko_task_failures_total{task="flaky"} 1.0' in metrics
            gate.go.set()
            await asyncio.wait_for(flaky.running.wait(), 10)
            r = await c.get("/ready")
            assert r.status_code == 200, r.text
            status = (await c.get("/v1/status")).json()
            assert (status["ready"], status["down"]) == (True, {}) and "why" not in status
            metrics = (await c.get("/metrics")).text
            assert 'ekko_task_up{task="flaky"} 1.0' in metrics
            assert 'ekko_task_restarts_total{task="flaky"} 1.0' in metrics
    failed = [r for r in caplog.records if r.getMessage() == "task flaky failed"]
    assert failed and failed[0].exc_info is not None  # the traceback is in the log
    assert runner.supervisor.status()["flaky"]["restarts"] == 1
    assert runner._status_extra()["flaky_runs"] == 2
    runner.stop()
    await asyncio.wait_for(task, 30)


class FakeWriter:
    def __init__(self, due: list[float | None], rows: int) -> None:
        self.due = due
        self.rows = rows
        self.released: list[tuple[float, int]] = []

    def next_due(self) -> float | None:
        return self.due[min(len(self.released), len(self.due) - 1)]

    def release(self, now: float, now_ns: int) -> int:
        self.released.append((now, now_ns))
        return self.rows


async def test_the_release_timer_releases_when_due_then_every_tick() -> None:
    clock = FakeClock()
    t0 = clock.wall()
    writer = FakeWriter([t0 + 0.01, None], rows=3)
    timer = ReleaseTimer(writer, clock)
    task = asyncio.create_task(timer.run())
    await until(lambda: len(writer.released) >= 3, "three releases")
    task.cancel()
    assert clock.slept[:2] == [pytest.approx(0.01), TICK_S]  # the due time, then a tick
    assert writer.released[0] == (pytest.approx(t0 + 0.01), int(writer.released[0][0] * 1e9))
    assert timer.step() == 3


class FakeModels:
    def __init__(self) -> None:
        self.advanced: list[float] = []
        self.ticks: list[tuple[float, float]] = []

    def advance_baseline(self, now_mono: float) -> None:
        self.advanced.append(now_mono)

    def guard_tick(self, now_mono: float, now_wall: float) -> None:
        self.ticks.append((now_mono, now_wall))


async def test_the_guard_ticker_advances_the_baseline_often_and_judges_per_interval() -> None:
    clock = FakeClock(wall=5_000.0, mono=10.0)
    models = FakeModels()
    task = asyncio.create_task(GuardTicker(models, 1.0, clock).run())
    await until(lambda: len(models.ticks) >= 3, "three guard ticks")
    task.cancel()
    mono = [m for m, _ in models.ticks]
    assert mono == pytest.approx([11.0, 12.0, 13.0], abs=ADVANCE_S)
    assert [w - m for m, w in models.ticks] == pytest.approx([4_990.0] * 3)  # one clock
    assert len(models.advanced) == pytest.approx(3 / ADVANCE_S, abs=1)


class FlakyDisk:
    def __init__(self, fail_calls: frozenset[int] | set[int] = frozenset({2})) -> None:
        self.calls = 0
        self.fail_calls = fail_calls
        self.slept_at_call: list[int] = []
        self.clock: FakeClock | None = None

    def waits_before(self) -> list[int]:
        """How many sleeps the clock saw between one call and the one before it."""
        seen = [0, *self.slept_at_call]
        return [b - a for a, b in itertools.pairwise(seen)][:5]

    def save_snapshot(self) -> None:
        self.calls += 1
        if self.clock is not None:
            self.slept_at_call.append(len(self.clock.slept))
        if self.calls in self.fail_calls:
            raise OSError(28, "No space left on device")


async def test_a_failed_snapshot_shows_until_one_succeeds_and_the_next_ones_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    disk = FlakyDisk(fail_calls={2, 3})
    disk.clock = clock
    snap = Snapshotter(disk, 30.0, clock)  # type: ignore[arg-type]
    seen_down: list[dict[str, str]] = []

    async def backoff(seconds: float) -> None:  # the supervisor's wait: look at /ready's view
        seen_down.append(sup.down())
        await asyncio.sleep(0)

    sup = Supervisor(sleep=backoff)
    with caplog.at_level(logging.ERROR):
        sup.start(snap.name, snap.run)
        await until(lambda: snap.saved >= 3, "three snapshots")
        await sup.stop()
    # Two failures in a row: each raised to the supervisor (traceback logged, counted, named
    # while it waited), and each restart tried again at once, not an interval later.
    assert snap.failed == 2 and sup.statistics()["snapshots"].failures == 2
    assert seen_down == [{"snapshots": "OSError: [Errno 28] No space left on device"}] * 2
    # waits of an interval before each call: none before the two retries (calls 3 and 4)
    assert disk.waits_before() == [1, 1, 0, 0, 1]
    assert "Traceback" in caplog.text and "No space left on device" in caplog.text
    assert sup.down() == {}
    assert snap.status() == {"snapshots": {"saved": snap.saved, "failed": 2}}
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Snapshotter(FlakyDisk(), 0, clock)  # type: ignore[arg-type]


def _link(answers: list[httpx.Response], tmp_path: Path) -> tuple[GuardLink, list, FakeClock]:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)])
    doc["durability"] = {"recovery_timeout_s": 0.5}  # run alone: no replica to recover from
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[min(len(seen), len(answers)) - 1]

    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    clock = FakeClock()
    http = ClusterHttp(cfg, tmp_path)
    return GuardLink(http, b"s3cret", Supervisor(), client, clock), seen, clock


async def test_a_guard_message_is_signed_retried_on_5xx_and_signed_again_after_a_restart(
    tmp_path: Path,
) -> None:
    resign = httpx.Response(401, headers={RESIGN_HEADER: "1"})
    answers = [httpx.Response(503), resign, httpx.Response(200)]
    link, seen, clock = _link(answers, tmp_path)
    assert await link.deliver("http://node/v1/models/m/guard/report", {"at": 1}) is True
    assert len(seen) == 3 and clock.slept == [0.2]  # a resign is no failure: no wait
    assert all("x-ekko-signature" in r.headers for r in seen)
    assert json.loads(seen[-1].content) == {"at": 1}
    await link.close()


async def test_a_guard_message_refused_by_every_attempt_is_dropped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    link, seen, clock = _link([httpx.Response(500)], tmp_path)
    with caplog.at_level(logging.ERROR, logger="ekko.node.guard_link"):
        assert await link.deliver("http://node/x", {}) is False
    assert len(seen) == ATTEMPTS and link.dropped == 1
    assert clock.slept == pytest.approx([0.2 * (i + 1) for i in range(ATTEMPTS)])
    assert f"dropped after {ATTEMPTS} attempts" in caplog.text
    await link.close()


async def test_a_failed_full_copy_is_tried_again_soon_backing_off(tmp_path: Path) -> None:
    """A checkpoint replica whose copy fails (the source down, or recovering: its
    /v1/snapshot answers 503) keeps its copy and tries again after 1, 2, 4... s up to the
    interval; once a copy loads, the next is an interval later. It waited a whole interval
    (300 s here), so a checkpoint replica started beside a recovering source served nothing
    for that long."""
    from ekko.node.checkpoint import RETRY_S, CheckpointRefresher
    from ekko.node.core import NodeCore
    from ekko.store.clock import FakeClock

    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 4)], checkpoint_every_s=300.0)
    doc["http"] = {"refresh_min_interval_s": 0}
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    core = NodeCore(cfg, "ckpt-r0", tmp_path)
    clock = FakeClock()
    refresher = CheckpointRefresher(core, ClusterHttp(cfg, tmp_path), b"s", None, print, clock)
    outcomes = iter([False, False, False, True, False, True])

    async def copy(client: object, url: str, started: float) -> bool:
        ok = next(outcomes, None)
        if ok is None:
            raise asyncio.CancelledError
        return ok

    refresher._copy = copy  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await refresher.run()
    waits = [s for s in clock.slept if s > 0]
    assert waits == [RETRY_S, 2 * RETRY_S, 4 * RETRY_S, 300.0, RETRY_S, 300.0]
    core.close()
