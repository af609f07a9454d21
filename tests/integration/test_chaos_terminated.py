"""A chaos run sent SIGTERM (a CI job's timeout, ``timeout``, systemd) stops every node it
started, unmounts its tmpfs and exits 143, as Ctrl-C does; Python's default SIGTERM ended
the harness at once and left its nodes, each in a session of its own, running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ekko.ops.cluster_init import cluster_doc, write_cluster

pytestmark = pytest.mark.integration


def _nodes_of(workdir: Path) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if pid.isdigit() and b"ekko\0node" in cmd and str(workdir).encode() in cmd:
            found.append(int(pid))
    return found


def test_sigterm_stops_the_nodes_a_chaos_run_started(tmp_path: Path) -> None:
    config = write_cluster(
        cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)]), tmp_path / "c.toml"
    )
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ekko", "chaos", "--config", str(config), "--duration", "60",
         "--timing", "short", "--workdir", str(workdir)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(_nodes_of(workdir)) < 2:  # both nodes spawned
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 143, out
        assert "terminated (SIGTERM); its nodes were stopped" in out
        assert _nodes_of(workdir) == []
        assert str(workdir) not in Path("/proc/mounts").read_text()  # the source's tmpfs
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _nodes_of(workdir):
            os.kill(pid, signal.SIGKILL)
