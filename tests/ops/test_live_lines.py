"""What the operator's screen says when it is not a terminal, and the incident it shows."""

from __future__ import annotations

import io
import threading

from rich.console import Console

from ekko.demo.dashboard import incident_line
from ekko.ops import live
from ekko.ops.launcher import NodeProcess


def test_watch_writes_a_line_per_interval_with_the_guard_when_not_a_terminal(
    monkeypatch,
) -> None:
    stop = threading.Event()
    polls = []

    def per_dc(_cluster) -> list[dict]:
        polls.append(1)
        if len(polls) == 3:
            stop.set()
        return [{"dc": "dc1", "one_way_delay_ms": 25.0, "p50_ms": 30.0, "p99_ms": 90.5,
                 "followers_p99_ms": 95.0, "rows": 10 * len(polls)}]  # fmt: skip

    monkeypatch.setattr(live, "per_dc", per_dc)
    monkeypatch.setattr(live, "_rows_total", lambda _c: {"dc1": 100 * len(polls)})
    guard = ["guard ctr: degraded, training paused; rolling back now: score 9.1 > 5"]
    monkeypatch.setattr(live, "guard_lines", lambda _c: guard)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    summary = live.watch(_Cluster({}), stop, duration=None, every=0.0, console=console)  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # one per interval, not one final frame
    for line in lines:
        assert "dc1 p50 30.0 p99 90.5 ms" in line and line.endswith(guard[0])
    assert summary["per_dc"][0]["dc"] == "dc1"


class _Proc:
    """A node process that has exited after ``exits_at`` polls (a stand-in for Popen)."""

    def __init__(self, polls: list[int], exits_at: int, code: int) -> None:
        self.polls, self.exits_at, self.returncode = polls, exits_at, code

    def poll(self) -> int | None:
        return self.returncode if len(self.polls) >= self.exits_at else None


class _Cluster:
    def __init__(self, procs: dict[str, NodeProcess]) -> None:
        self.procs = procs


def test_watch_says_once_which_node_exited_and_where_its_log_is(monkeypatch, tmp_path) -> None:
    """Found running ``ekko up`` as a user: the source was killed and the screen went on
    with "0 rows/s" and "connection refused", never naming the node that had exited."""
    stop = threading.Event()
    polls: list[int] = []

    def per_dc(_cluster) -> list[dict]:
        polls.append(1)
        if len(polls) == 4:
            stop.set()
        return []

    monkeypatch.setattr(live, "per_dc", per_dc)
    monkeypatch.setattr(live, "_rows_total", lambda _c: {})
    monkeypatch.setattr(live, "guard_lines", lambda _c: [])
    log = tmp_path / "source.log"
    procs = {
        "source": NodeProcess("source", _Proc(polls, 2, -9), log),  # type: ignore[arg-type]
        "dc1-r0": NodeProcess("dc1-r0", _Proc(polls, 99, 0), tmp_path / "r.log"),  # type: ignore[arg-type]
    }
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    live.watch(_Cluster(procs), stop, duration=None, every=0.0, console=console)  # type: ignore[arg-type]
    said = [line for line in out.getvalue().splitlines() if "exited" in line]
    assert said == [f"node source exited (code -9); its log: {log}"]


def test_the_incident_line_says_when_poison_detection_and_rollback_happened() -> None:
    started = 1_000.0
    guard = {
        "state": "recovering",
        "incident": None,
        "incidents": [{"detected_at": 1_027.4, "detected_by": "dc2-r0", "decided_at": 1_027.9,
                       "completed_at": 1_028.6, "rows_restored": 4_096}],
    }  # fmt: skip
    line = incident_line(guard, (20.0, 40.0), started)
    assert line == (
        "poisoned training 20–40 s; incident: detected at 27.4 s by dc2-r0, rolled back at "
        "27.9 s (4096 rows restored), every replica restored at 28.6 s"
    )
    assert incident_line({"state": "healthy"}, None, started) is None
    assert incident_line({"state": "suspect"}, (5.0, 25.0), started) == (
        "poisoned training 5–25 s; guard suspect: no incident yet"
    )
