"""The dashboard's samples: update latency of the last interval only (a histogram reset
between two samples is not a negative count), bytes per link as rates, a bounded ring."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ekko.node.config import load_config
from ekko.node.dashboard import RING
from ekko.node.runner import NodeRunner
from ekko.ops.cluster_init import cluster_doc, write_cluster
from ekko.store.clock import FakeClock


def test_samples_hold_the_last_interval_and_the_ring_is_bounded(tmp_path: Path) -> None:
    doc = cluster_doc(dcs=1, replicas=1, tables=[("emb", 4, 2)], sync={"snapshot_interval_s": 0})
    cfg = load_config(write_cluster(doc, tmp_path / "cluster.toml"))
    clock = FakeClock()
    runner = NodeRunner(cfg, "dc1-r0", tmp_path, clock=clock)
    rec, h = runner.series, runner.core.latency

    def sample() -> dict:
        clock.advance(1.0)
        return rec.sample({"dc1-r0": h.counts.copy()})

    h.record_ns(np.full(100, 10_000_000))  # 100 rows applied 10 ms after their write
    first = sample()
    assert first["latency"]["dc1"]["rows"] == 100
    assert 10 <= first["latency"]["dc1"]["p50_ms"] <= 10.5
    assert first["bytes_per_s"] == {"dc1-r0→pullers": 0.0}  # no rate from one sample
    assert sample()["latency"] == {}  # nothing applied since: no figure, not the lifetime's
    h.reset()
    h.record_ns(np.full(5, 50_000_000))
    after_reset = sample()["latency"]["dc1"]
    assert after_reset["rows"] == 5 and after_reset["p99_ms"] >= 50
    assert set(first) >= {"t", "latency", "bytes_per_s", "lag", "guard"}
    for _ in range(RING + 5):
        sample()
    assert len(rec.samples) == RING
    assert rec.samples[-1]["t"] - rec.samples[0]["t"] == RING - 1


def test_the_page_puts_names_and_values_in_as_text_never_as_markup() -> None:
    """DC, node, link and model names come from the config and values from the node; the
    page is open, so none of them may be parsed as HTML (the legend and the guard list
    were built with innerHTML: a DC named ``<img src=x onerror=...>`` would run script in
    the browser of whoever opens /ui). Only constant markup uses innerHTML."""
    from ekko.node.ui_page import PAGE

    assignments = re.findall(r"innerHTML\s*=\s*([^;]*);", PAGE)
    assert assignments, "the page's constant placeholders"
    interpolated = [a for a in assignments if "${" in a or "+" in a]
    assert not interpolated, interpolated
