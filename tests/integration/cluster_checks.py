"""Polling helpers the multi-process tests share: other processes' state is read over HTTP
until it holds or a deadline passes (there is no event to await across processes)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from ekko.ops.launcher import LocalCluster

T = TypeVar("T")


def until(what: str, check: Callable[[], T], deadline_s: float = 30.0, every_s: float = 0.1) -> T:
    """``check()`` once it is truthy; fails naming ``what`` when ``deadline_s`` passes."""
    end = time.monotonic() + deadline_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(every_s)  # other processes are working; bounded by the deadline


def digests(cluster: LocalCluster, name: str) -> dict[str, str]:
    """Each table's digest at node ``name``."""
    return {t: v["digest"] for t, v in cluster.get(name, "/v1/status")["tables"].items()}


def wait_converged(cluster: LocalCluster, deadline_s: float = 60.0) -> dict[str, dict[str, str]]:
    """Every node's digests, once all equal the source's or the deadline passes (the caller
    asserts, so a failure shows which node differs)."""
    names = [n.name for n in cluster.config.nodes]
    end = time.monotonic() + deadline_s
    while True:
        want = digests(cluster, "source")
        got = {n: digests(cluster, n) for n in names}
        if all(d == want for d in got.values()) or time.monotonic() > end:
            return got
        time.sleep(0.2)  # polling other processes over HTTP, bounded by the deadline
