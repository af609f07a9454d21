"""Issue 13 §2 over real processes: the source is SIGKILLed mid-writes and restarted, once
with its data dir and once without. Writes go on through the admin API from several clients;
afterwards every node holds the same rows (digest) and every acknowledged write — key to the
value of its last acknowledged write — is at the source and at every replica."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import pytest
from cluster_checks import wait_converged

pytestmark = pytest.mark.integration

DIM = 4
WRITERS = 3
KEYS_PER_WRITER = 2000
BATCH = 25


class Writer(threading.Thread):
    """Writes batches to its own key range, one request at a time. A request whose outcome
    is unknown (the source died under it) is sent again until it is acknowledged, so the
    last acknowledged value of a key is also the last value sent for it."""

    def __init__(self, cluster, index: int, stop: threading.Event, running: threading.Event):
        super().__init__(daemon=True)
        self.url = cluster.url("source", "/v1/tables/emb/rows")
        self.auth = cluster.auth
        self.rng = np.random.default_rng(100 + index)
        self.base = index * KEYS_PER_WRITER
        self.stop, self.running = stop, running  # running: clear to pause the writers
        self.acked: dict[int, list[float]] = {}
        self.acked_at: dict[int, float] = {}
        self.acks = self.refused = 0
        self.idle = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0, auth=self.auth) as client:
            while not self.stop.is_set():
                if not self.running.is_set():
                    self.idle.set()
                    self.running.wait()
                    continue
                self.idle.clear()
                keys = (self.base + self.rng.integers(0, KEYS_PER_WRITER, BATCH)).tolist()
                values = self.rng.standard_normal((BATCH, DIM)).round(3).tolist()
                self._send(client, {"keys": keys, "values": values})
        self.idle.set()

    def _send(self, client: httpx.Client, body: dict) -> None:
        while not self.stop.is_set():
            try:
                r = client.post(self.url, json=body)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 200:
                now = time.monotonic()
                for k, v in zip(body["keys"], body["values"], strict=True):
                    self.acked[k] = v
                    self.acked_at[k] = now
                self.acks += 1
                return
            self.refused += 1
            time.sleep(0.02)  # the source is down or recovering: retry the same rows


def _read(cluster, name: str, keys: list[int]) -> dict[int, list[float] | None]:
    out: dict[int, list[float] | None] = {}
    for i in range(0, len(keys), 400):
        part = keys[i : i + 400]
        doc = cluster.get(name, f"/v1/tables/emb/rows?keys={','.join(map(str, part))}")
        for row in doc["rows"]:
            out[row["key"]] = row["value"] if row["found"] else None
    return out


def _run_writers_for(seconds: float) -> None:
    time.sleep(seconds)  # the writers write meanwhile; the test only decides when to kill


def test_source_sigkill_mid_writes_loses_nothing_acknowledged(make_cluster):
    cluster = make_cluster(
        dcs=2,
        replicas=2,
        wan_delay_ms=[5, 10],
        tables=[("emb", DIM, 8)],
        sync={"snapshot_interval_s": 1.0, "failover_probe_s": 0.5, "cache_capacity": 256},
    )
    cluster.start()
    stop, running = threading.Event(), threading.Event()
    running.set()
    writers = [Writer(cluster, i, stop, running) for i in range(WRITERS)]
    for w in writers:
        w.start()
    try:
        _run_writers_for(2.0)
        # 1. SIGKILL mid-writes, restart with the data dir (snapshot + write-ahead log).
        cluster.kill("source")
        cluster.restart("source")
        _run_writers_for(2.0)
        # 2. Without the data dir: what replicas held must come back. Rows acknowledged in
        # the instant before the kill may have reached no replica (their only copy was on
        # the lost disk), so the writers pause until every replica has caught up, resume,
        # and the kill follows; keys acknowledged after the resume are checked only if
        # written again after the restart.
        running.clear()
        for w in writers:
            assert w.idle.wait(10)
        got = wait_converged(cluster, 30)
        assert len({str(d) for d in got.values()}) == 1, got
        # Every replica met the new source process (directly or through its DC's leader)
        # and took its knowledge back to what the old one's disk backed.
        for node in cluster.config.nodes:
            if node.name != "source":
                links = cluster.get(node.name, "/v1/status")["links"]
                assert sum(p["epoch_changes"] for p in links.values()) >= 1, (node.name, links)
        running.set()
        resumed = time.monotonic()
        _run_writers_for(0.3)
        cluster.kill("source")
        killed = time.monotonic()
        shutil.rmtree(cluster.log_dir / "source")
        cluster.restart("source")
        _run_writers_for(2.0)
    finally:
        stop.set()
        running.set()
        for w in writers:
            w.join(15)
    acked: dict[int, list[float]] = {}
    at_risk: set[int] = set()
    for w in writers:
        acked.update(w.acked)
        at_risk |= {k for k, t in w.acked_at.items() if resumed <= t <= killed}
    assert sum(w.acks for w in writers) > 100 and sum(w.refused for w in writers) > 0

    got = wait_converged(cluster, 40)
    want = got["source"]
    for name, digests in got.items():
        assert digests == want, f"{name} diverged from the source: {got}"
    checked = sorted(set(acked) - at_risk)
    assert len(checked) > len(acked) // 2
    for node in [n.name for n in cluster.config.nodes]:
        held = _read(cluster, node, checked)
        lost = [k for k in checked if held[k] is None]
        assert not lost, f"{node} lost {len(lost)} acknowledged rows, e.g. {lost[:5]}"
        wrong = [k for k in checked if not np.allclose(held[k], acked[k], atol=1e-6)]
        assert not wrong, f"{node}: {len(wrong)} rows differ from their last acknowledged write"
