"""A node started by a launcher stops once the launcher is gone (``ekko.node.parent_watch``):
a launcher killed outright (kill -9, a test run's timeout) had left its nodes running."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ekko.node.parent_watch import ParentWatch, parent_pid
from ekko.store.clock import FakeClock


def test_the_watch_stops_the_node_once_the_parent_changes() -> None:
    parents = iter([4242, 4242, 4242, 1])
    stopped: list[bool] = []
    clock = FakeClock()
    watch = ParentWatch(4242, lambda: stopped.append(True), clock, getppid=lambda: next(parents))
    asyncio.run(watch.run())
    assert stopped == [True] and watch.stopped
    assert clock.slept == [1.0, 1.0, 1.0]  # three checks with the launcher there, then out


@pytest.mark.parametrize(("raw", "want"), [(None, None), ("", None), ("4242", 4242)])
def test_the_parent_pid_comes_from_the_environment(raw: str | None, want: int | None) -> None:
    env = {} if raw is None else {"EKKO_PARENT_PID": raw}
    assert parent_pid(env) == want


@pytest.mark.parametrize("raw", ["abc", "1", "0", "-5", "1.5"])
def test_a_parent_pid_that_is_no_pid_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ValueError, match=r"EKKO_PARENT_PID=.*expected the launcher's process"):
        parent_pid({"EKKO_PARENT_PID": raw})


@pytest.mark.integration
def test_nodes_of_a_launcher_killed_outright_stop(tmp_path: Path) -> None:
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(f"""
        import time
        from pathlib import Path
        from ekko.ops.cluster_init import cluster_doc, write_cluster
        from ekko.ops.launcher import LocalCluster
        doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)])
        c = LocalCluster(write_cluster(doc, Path({str(tmp_path)!r}) / "cluster.toml"))
        c.start(timeout=120)
        print(" ".join(str(p.proc.pid) for p in c.procs.values()), flush=True)
        time.sleep(600)
    """)
    )
    launcher = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    pids: list[int] = []
    try:
        line = launcher.stdout.readline() if launcher.stdout else ""
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2, line
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.monotonic() + 30
        alive = list(pids)
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if _alive(p)]
            time.sleep(0.2)
        assert not alive, f"nodes {alive} still running after their launcher was killed"
    finally:
        launcher.kill()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
